"""Full SciFact test evaluation end to end, side by side in one process (all-MiniLM-L6-v2, mean pooling, max 256):

  st      sentence-transformers encode + mteb.evaluate on the local folder (mteb's own search and metrics)
  fp32    python -m dret.eval (fresh embedding cache)        cached  the same again (cache hit)
  bf16    python -m dret.eval --dtype bfloat16               mteb    mteb.evaluate with dret's wrapper

Each line: NDCG@10, seconds (load + encode + search + metrics), docs/s, achieved encode GFLOP/s (matmul + attention
FLOPs of the real tokens: 6 layers x (2L(4d^2 + 2df) + 4L^2 d) per text), and the speed ratio to sentence-transformers.
Usage: PYTHONPATH=. python bench/eval_scifact.py [--data DIR] [--runs st,fp32,cached,bf16,mteb] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from dret.eval import datasets
from dret.eval.__main__ import main as dret_eval

MAX_LEN, LAYERS, D, FF = 256, 6, 384, 1536


def encode_flops(tokenizer, texts: list[str]) -> float:
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]], float)
    return float(LAYERS * (2 * lengths * (4 * D * D + 2 * D * FF) + 4 * lengths ** 2 * D).sum())


def run_st(model_dir: str, folder: str) -> dict:
    import mteb
    from sentence_transformers import SentenceTransformer

    from dret.eval.mteb_model import local_task, scores

    start = time.perf_counter()
    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = MAX_LEN
    encode, spent = st.encode, [0.0]

    def timed_encode(*args, **kwargs):
        t = time.perf_counter()
        out = encode(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out
    st.encode = timed_encode
    task = local_task(datasets.load_beir(folder), "test")
    result = scores(mteb.evaluate(st, [task], cache=None, show_progress_bar=False,
                                  encode_kwargs={"batch_size": 64}))[0]
    return {"ndcg_at_10": result["ndcg_at_10"], "seconds": time.perf_counter() - start, "encode_seconds": spent[0]}


def run_dret(model_dir: str, folder: str, cache_dir: str, *extra: str) -> dict:
    start = time.perf_counter()
    r = dret_eval(["--model", model_dir, "--data", folder, "--max_seq_length", str(MAX_LEN), "--cache_dir", cache_dir,
                   "--output_folder", os.path.join(cache_dir, "results"), "--top_k", "1000", *extra])[0]
    return {"ndcg_at_10": r["ndcg_at_10"], "seconds": time.perf_counter() - start, "encode_seconds": r["encode_seconds"]}


def run_mteb_dret(model_dir: str, folder: str, batch: int) -> dict:
    from dret.eval.mteb_model import MtebModel, evaluate_tasks, local_task
    from dret.model import Embedder

    start = time.perf_counter()
    model = MtebModel(Embedder.from_pretrained(model_dir), query_max_length=MAX_LEN, passage_max_length=MAX_LEN,
                      batch_size=batch)
    result = evaluate_tasks(model, [local_task(datasets.load_beir(folder), "test")])[0]
    return {"ndcg_at_10": result["ndcg_at_10"], "seconds": time.perf_counter() - start, "encode_seconds": None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir_scifact"))
    p.add_argument("--runs", default="st,fp32,cached,bf16,mteb")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    from dret.demo import bundled_minilm
    import transformers

    model_dir = bundled_minilm()
    data = datasets.load_beir(args.data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    flops = encode_flops(tokenizer, data.corpus_texts) + encode_flops(tokenizer, data.query_texts)
    print(f"SciFact test: {len(data.corpus_texts)} docs + {len(data.query_texts)} queries, encode {flops / 1e12:.1f} TFLOP; "
          f"load average {os.getloadavg()[0]:.1f}")
    cache_dir = tempfile.mkdtemp(prefix="dret_bench_cache_")
    batch = ["--eval_batch_size", str(args.batch)]
    runners = {"st": lambda: run_st(model_dir, args.data),
               "fp32": lambda: run_dret(model_dir, args.data, cache_dir, *batch),
               "cached": lambda: run_dret(model_dir, args.data, cache_dir, *batch),
               "bf16": lambda: run_dret(model_dir, args.data, cache_dir, "--dtype", "bfloat16", *batch),
               "mteb": lambda: run_mteb_dret(model_dir, args.data, args.batch)}
    rows = {}
    print("| run | NDCG@10 | seconds | docs/s | encode GFLOP/s | speed vs st | load avg |")
    print("|---|---|---|---|---|---|---|")
    for name in args.runs.split(","):
        r = rows[name] = runners[name]()
        gflops = f"{flops / r['encode_seconds'] / 1e9:.0f}" if r["encode_seconds"] else "-"
        ratio = f"{rows['st']['seconds'] / r['seconds']:.2f}x" if "st" in rows else "-"
        print(f"| {name} | {r['ndcg_at_10']:.4f} | {r['seconds']:.1f} | {len(data.corpus_texts) / r['seconds']:.1f} | "
              f"{gflops} | {ratio} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
