"""Fine-tune all-MiniLM-L6-v2 on SciFact train with dret and with sentence-transformers (MNRL), same settings,
same run; evaluate both on SciFact test with the same evaluator; report NDCG@10 and training examples/s.

    .venv/bin/python bench/train_scifact.py [--out bench/RESULTS_train.md] [--steps N]

Settings (../shared/anchors/quality_cpu.md, row 3a): 1 epoch, batch 32, group 4 (1 positive + 3 negatives
from the jsonl), lr 2e-5, warmup 3 steps then linear decay, weight decay 0, temperature 0.05 (MNRL scale 20),
passage 256 tokens, mean pooling, fp32, seed 42. dret drops the last partial batch (25 steps); MNRL keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
TRAIN = os.path.join(DATA, "train_jsonl", "scifact_train.jsonl")
BEIR = os.path.join(DATA, "beir_scifact")
BATCH, GROUP, LR, WARMUP, TEMPERATURE, PASSAGE_LEN, QUERY_LEN, SEED = 32, 4, 2e-5, 3, 0.05, 256, 64, 42


def evaluate(model_dir: str) -> dict:
    from dret.eval.run import evaluate_beir
    from dret.model import Embedder

    return evaluate_beir(Embedder.from_pretrained(model_dir), BEIR, "test", top_k=100)


def train_dret(workdir: str, max_steps: int) -> tuple[str, float, int]:
    from dret.trainer import train_and_evaluate
    from ml_configs import base

    c = base.get_config()
    c.model_name_or_path = "bundled:all-MiniLM-L6-v2"
    c.train_data, c.output_dir = TRAIN, os.path.join(workdir, "dret")
    c.data_cache_dir = os.path.join(workdir, "cache")
    c.sentence_pooling_method, c.per_device_train_batch_size, c.train_group_size = "mean", BATCH, GROUP
    c.learning_rate, c.warmup_steps, c.temperature, c.weight_decay = LR, WARMUP, TEMPERATURE, 0.0
    c.passage_max_len, c.query_max_len, c.seed, c.num_train_epochs = PASSAGE_LEN, QUERY_LEN, SEED, 1
    c.max_steps, c.logging_steps, c.save_steps = max_steps, 5, 1000
    start = time.perf_counter()
    export_dir = train_and_evaluate(c)
    seconds = time.perf_counter() - start
    steps = [json.loads(line)["step"] for line in open(os.path.join(c.output_dir, "metrics.jsonl"))][-1]
    return export_dir, seconds, steps * BATCH


def train_sentence_transformers(workdir: str, max_steps: int) -> tuple[str, float, int]:
    import datasets
    import torch
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers

    from dret.resources import bundled_minilm

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    rows = [json.loads(line) for line in open(TRAIN)]
    columns = {"anchor": [], "positive": [], **{f"negative_{i}": [] for i in range(1, GROUP)}}
    for row in rows:
        columns["anchor"].append(row["query"])
        columns["positive"].append(row["pos"][0])
        negs = rng.sample(row["neg"], GROUP - 1) if len(row["neg"]) >= GROUP - 1 else rng.choices(row["neg"], k=GROUP - 1)
        for i, neg in enumerate(negs, 1):
            columns[f"negative_{i}"].append(neg)
    model = SentenceTransformer(bundled_minilm(), device="cpu")
    model.max_seq_length = PASSAGE_LEN
    out = os.path.join(workdir, "st")
    args = SentenceTransformerTrainingArguments(
        output_dir=out, num_train_epochs=1, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_steps=WARMUP, weight_decay=0.0, seed=SEED, data_seed=SEED, max_steps=max_steps,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to=[], logging_steps=5)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(columns),
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    model.save(os.path.join(out, "final"))
    return os.path.join(out, "final"), seconds, min(result.global_step * BATCH, len(rows))  # last batch: 9 rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS_train.md"))
    parser.add_argument("--steps", type=int, default=-1, help="cap both runs (smoke test); -1 = one epoch")
    parser.add_argument("--workdir", default="", help="where the runs write (default: a new temporary folder)")
    parser.add_argument("--systems", default="zero,dret,st",
                        help="which rows to run: zero (zero-shot), dret, st (sentence-transformers MNRL)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    from dret.resources import bundled_minilm

    workdir = args.workdir or tempfile.mkdtemp(prefix="dret_train_bench_")  # kept: the trained models stay
    systems = args.systems.split(",")
    zero_shot = evaluate(bundled_minilm()) if "zero" in systems else None
    runs = {}
    trainers = {"dret": ("dret", train_dret), "st": ("sentence-transformers MNRL", train_sentence_transformers)}
    for name, train in (trainers[s] for s in systems if s != "zero"):
        model_dir, seconds, examples = train(workdir, args.steps)
        runs[name] = (evaluate(model_dir), seconds, examples)
        print(name, runs[name][0]["ndcg_at_10"], seconds, examples, model_dir, flush=True)
    lines = ["# SciFact fine-tuning: dret vs sentence-transformers (CPU)", "",
             f"Machine: {os.cpu_count()} CPU cores, fp32, same run. Command: `.venv/bin/python bench/train_scifact.py`",
             f"Settings: {__doc__.split('Settings')[1].strip()}", "",
             "| system | NDCG@10 | MRR@10 | R@10 | R@100 | train s | examples | examples/s |",
             "|---|---|---|---|---|---|---|---|"]
    if zero_shot:
        lines.append(f"| all-MiniLM-L6-v2 zero-shot | {zero_shot['ndcg_at_10']:.4f} | {zero_shot['mrr_at_10']:.4f} | "
                     f"{zero_shot['recall_at_10']:.4f} | {zero_shot['recall_at_100']:.4f} | - | - | - |")
    for name, (m, seconds, examples) in runs.items():
        lines.append(f"| {name} | {m['ndcg_at_10']:.4f} | {m['mrr_at_10']:.4f} | {m['recall_at_10']:.4f} | "
                     f"{m['recall_at_100']:.4f} | {seconds:.0f} | {examples} | {examples / seconds:.2f} |")
    speed = {n: e / s for n, (_, s, e) in runs.items()}
    if len(speed) == 2:
        lines += ["", f"dret / sentence-transformers examples/s: {speed['dret'] / speed['sentence-transformers MNRL']:.2f}x "
                  "(dret's train seconds include its one-time XLA compile and the export)."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
