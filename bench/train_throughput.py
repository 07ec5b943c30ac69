"""Training throughput on one accelerator: dret's train step against the PyTorch reference, workload by workload.

The workloads of `../shared/anchors/torch_contrastive.py`, same names, shapes and real-length indexing: BERT-base
shape (vocab 18k, 12 x 768), random weights, bf16 compute with float32 master weights, CLS pooling, temperature
0.02, in-batch + group negatives, AdamW, dropout 0.1. dret's side is the trainer's own pieces (precision,
optimizer, sharded state, jitted step) on synthetic batches; the torch side is the anchor, run as a subprocess
(skipped where torch has no CUDA). Each dret workload runs in a fresh process, so that its peak device memory is
its own and torch never shares the chip with it. One JSON line per workload and system, elapsed times on stderr,
then a markdown table on stdout (and appended to --out).

    python bench/train_throughput.py [--workload all|W1,W2] [--steps 10] [--warmup 2] [--out bench/RESULTS_gpu.md]
    python bench/train_throughput.py --tiny --workload bert-base-seed,bert-base-reallen   # CPU, seconds

dret's step has a fixed shape: real-length workloads are padded to 32 / 512 tokens (longer texts cut there), so
dret computes every padding token where torch pads each batch to its longest text. Model FLOPs and tokens/s
count real tokens (from the masks) on both sides; packing (issue 17 item 3) will make dret's cost follow them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ANCHORS = os.path.join(ROOT, "..", "shared", "anchors")


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int
    group: int
    query_len: int  # dret pads every query to this length
    passage_len: int
    recompute: bool
    real_lengths: bool  # text lengths from the anchor's scifact_train_lengths.json, cut at the lengths above
    fp8: bool = False  # dret's Linear matmuls in FP8 (config fp8=True); torch runs its bf16 workload (TORCH_NAME)


WORKLOADS = {
    "bert-base-seed": Workload(64, 4, 32, 512, True, False),
    "bert-base-norecompute": Workload(64, 4, 32, 512, False, False),
    "bert-base-short": Workload(256, 8, 32, 128, False, False),
    "bert-base-reallen": Workload(64, 4, 32, 512, False, True),
    "bert-base-reallen-recompute": Workload(64, 4, 32, 512, True, True),
    "bert-base-fp8": Workload(64, 4, 32, 512, False, False, fp8=True),
}
TORCH_NAME = {"bert-base-fp8": "bert-base-norecompute"}  # the anchor's workload a dret workload is compared with
SKIPPED = {"llama7b-lora-seed": "waits for the decoder issue (Llama-7B, LoRA r32, batch 1 x group 4, passage 4096)"}
BERT_BASE_HF = dict(model_type="bert", vocab_size=18000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=2048)
TINY_HF = dict(BERT_BASE_HF, vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=64)
VERSIONS = ("jax", "flax", "optax", "torch", "transformers")


def sized(w: Workload, tiny: bool) -> Workload:
    """The workload, or its --tiny shape: batch 8 x group 2, query 8 / passage 32."""
    return dataclasses.replace(w, batch=8, group=2, query_len=8, passage_len=32) if tiny else w


def text_lengths(w: Workload, step: int, lengths: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(query lengths [B], passage lengths [B*G]) of step `step`: the anchor's indexing into the real lengths,
    query[(step*B + j) % n] and passage[(step*B*G + j) % m], cut at the padded lengths; else all full."""
    n = w.batch * w.group
    if not w.real_lengths:
        return np.full(w.batch, w.query_len), np.full(n, w.passage_len)
    query, passage = np.asarray(lengths["query"]), np.asarray(lengths["passage"])
    return (np.minimum(query[(step * w.batch + np.arange(w.batch)) % len(query)], w.query_len),
            np.minimum(passage[(step * n + np.arange(n)) % len(passage)], w.passage_len))


def read_lengths(path: str) -> dict:
    """{"query": [...], "passage": [...]} token lengths (the anchor's scifact_train_lengths.json)."""
    if not os.path.isfile(path):
        sys.exit(f"--lengths: {path} not found: expected the anchor's scifact_train_lengths.json")
    with open(path) as f:
        return json.load(f)


def make_batch(w: Workload, step: int, lengths: dict | None, vocab_size: int) -> dict:
    """Random token ids padded to the workload's lengths, with masks marking the real tokens."""
    rng = np.random.default_rng(step)
    batch = {}
    for kind, lengths_b, width in zip(("query", "passage"), text_lengths(w, step, lengths),
                                      (w.query_len, w.passage_len)):
        mask_bt = (np.arange(width)[None, :] < lengths_b[:, None]).astype(np.int32)
        batch[f"{kind}_ids"] = rng.integers(0, vocab_size, mask_bt.shape, dtype=np.int32) * mask_bt
        batch[f"{kind}_mask"] = mask_bt
    return batch


def significant(x: float) -> float:
    return float(f"{x:.4g}")


def measure_dret(name: str, w: Workload, hf: dict, steps: int, warmup: int, lengths: dict | None) -> dict:
    """dret's train step on one workload, in this process: warm-up steps (compile included), then timed steps.
    Imports jax and dret here: only the child loads them, the parent stays light and never touches the chip."""
    import jax
    from flax import nnx

    from dret import models, peft
    from dret.flops import ModelFlops, mfu_metrics
    from dret.models import fp8
    from dret.sharding import batch_sharding, make_mesh
    from dret.train_step import create_state, make_optimizer, make_step, precision
    from ml_configs import base

    config = base.get_config()
    config.bf16, config.fp8, config.recompute, config.sentence_pooling_method = True, w.fp8, w.recompute, "cls"
    config.per_device_train_batch_size = w.batch // jax.device_count()
    config.train_group_size, config.temperature = w.group, 0.02
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    dtype, param_dtype = precision(config)
    backbone = models.build(hf, dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                            rngs=nnx.Rngs(config.seed))
    if config.fp8:
        fp8.enable(backbone)  # as dret.build does
    flops = ModelFlops.of(backbone, hf)
    graphdef, params, frozen = peft.split_trainable(backbone, hf, config)
    tx, _ = make_optimizer(config, total_steps=1000)
    state, shardings = create_state(params, frozen, tx, mesh, config)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, hf["hidden_size"])

    host = [make_batch(w, i, lengths, hf["vocab_size"]) for i in range(warmup + steps)]
    batches = [{k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()} for b in host]
    start = time.perf_counter()
    for batch in batches[:warmup]:
        state, metrics = step_fn(state, batch, step_config)
    jax.block_until_ready((state, metrics))
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[warmup:]:
        state, metrics = step_fn(state, batch, step_config)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps

    timed = host[warmup:]
    real_tokens = np.mean([b["query_mask"].sum() + b["passage_mask"].sum() for b in timed])
    padded_tokens = w.batch * w.query_len + w.batch * w.group * w.passage_len
    devices = list(mesh.devices.flat)
    rates = mfu_metrics(np.mean([flops.of_batch(b) for b in timed]), step_s, devices)
    stats = [d.memory_stats() or {} for d in devices]
    peak = max(s["peak_bytes_in_use"] for s in stats) if all("peak_bytes_in_use" in s for s in stats) else None
    return dict(
        workload=name, system="dret", batch=w.batch, group=w.group, qlen=w.query_len, plen=w.passage_len,
        real_lengths=w.real_lengths, recompute=w.recompute, fp8=w.fp8, step_s=significant(step_s),
        examples_per_s=significant(w.batch / step_s), tokens_per_s=round(real_tokens / step_s),
        computed_tokens_per_s=round(padded_tokens / step_s),
        model_tflops_per_s=significant(rates["model_tflops_per_s"]),
        mfu=significant(rates["mfu"]) if "mfu" in rates else "n/a",
        peak_mem_gib=significant(peak / 2**30) if peak is not None else "n/a", warmup_s=significant(warmup_s),
        loss=significant(float(metrics["loss"])), jax=jax.__version__, device=jax.devices()[0].device_kind,
        devices=jax.device_count())


def run_dret(name: str, args) -> dict:
    """measure_dret in a fresh process (its own peak memory, the chip to itself); an error row if it fails."""
    command = [sys.executable, os.path.abspath(__file__), "--dret-child", "--workload", name, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--lengths", args.lengths] + ["--tiny"] * args.tiny
    # The child has the chip to itself: let XLA take 95% of it (default 75%; bert-base-short needs more).
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stderr.write(done.stderr)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(workload=name, system="dret", error=f"exit {done.returncode}: {tail[:300]}")
    return rows[-1]


def torch_skip_reason(args) -> str | None:
    """Why the torch side cannot run here (None: it can)."""
    if args.tiny:
        return "--tiny runs on CPU"
    if not os.path.isfile(args.anchor):
        return f"the anchor {args.anchor} is missing"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.returncode:
        return "torch is not installed"
    return None if probe.stdout.strip() == "True" else "torch has no CUDA device"


def run_torch(names: list[str], args) -> dict[str, dict]:
    """The anchor's JSON line per workload (one process for all), with the seconds each took."""
    command = [sys.executable, args.anchor, "--workload", ",".join(names), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    rows, start = {}, time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as anchor:
        for line in anchor.stdout:
            if line.startswith("{"):
                row = dict(json.loads(line), system="torch", elapsed_s=round(time.perf_counter() - start, 1))
                start = time.perf_counter()
                rows[row["workload"]] = row
                print(json.dumps(row), flush=True)
                print(f"[torch {row['workload']}] {row['elapsed_s']} s", file=sys.stderr, flush=True)
    for name in names:  # the anchor died before reporting these
        rows.setdefault(name, dict(workload=name, system="torch", error=f"no result (anchor exit {anchor.returncode})"))
    return rows


def describe(w: Workload) -> str:
    recompute = ("recompute" if w.recompute else "no recompute") + (", dret's Linear matmuls in FP8 (torch bf16)"
                                                                    if w.fp8 else "")
    if w.real_lengths:
        return (f"batch {w.batch} x group {w.group}, SciFact train lengths, {recompute}; torch pads each batch to "
                f"its longest text, dret pads every text to {w.query_len} / {w.passage_len} and cuts longer ones there "
                f"(fixed step shape; packing, issue 17 item 3, will make its cost follow real tokens)")
    return f"batch {w.batch} x group {w.group}, query {w.query_len} / passage {w.passage_len}, {recompute}"


def cell(row: dict, key: str) -> str:
    return str(row[key]) if key in row and row[key] is not None else "n/a"


def markdown(names: list[str], rows: dict, torch_note: str | None, args, device: str) -> str:
    """The results section: date, chip, versions, settings, one table per workload, what was skipped."""
    versions = []
    for package in VERSIONS:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Training throughput, {date}{' (--tiny, CPU)' if args.tiny else ''}", "",
             f"Chip: {device}. Versions: {', '.join(versions)}. Command: `python bench/train_throughput.py "
             f"{' '.join(sys.argv[1:])}` ({args.warmup} warm-up + {args.steps} timed steps per workload and system).",
             "Random weights, bf16 compute (float32 master weights), CLS pooling, temperature 0.02, in-batch + group "
             "negatives, AdamW, dropout 0.1. Tokens and model FLOPs count real tokens only (6 x matmul weights per "
             "token + attention, fwd + bwd); MFU against the chip's dense bf16 peak (989 TFLOP/s on H200). Peak "
             "memory: dret `peak_bytes_in_use`, torch `max_memory_allocated`.", ""]
    for name in names:
        if name in SKIPPED:
            continue
        lines += [f"### {name}: {describe(sized(WORKLOADS[name], args.tiny))}", "",
                  "| system | s/step | examples/s | real tokens/s | model TFLOP/s | MFU | peak GiB | dret / torch |",
                  "|---|---|---|---|---|---|---|---|"]
        dret, torch = rows[name, "dret"], rows.get((name, "torch"))
        for row in (torch, dret):
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {row['system']} | error: {row['error']} | | | | | | |")
                continue
            ratio = ""
            if row is dret and torch is not None and "examples_per_s" in torch:
                ratio = f"**{dret['examples_per_s'] / torch['examples_per_s']:.2f}x**"
            mfu = cell(row, "mfu" if row is dret else "mfu_vs_989")
            lines.append(f"| {row['system']} | {cell(row, 'step_s')} | {cell(row, 'examples_per_s')} | "
                         f"{cell(row, 'tokens_per_s')} | {cell(row, 'model_tflops_per_s')} | {mfu} | "
                         f"{cell(row, 'peak_mem_gib')} | {ratio} |")
        elapsed = [f"{s} {rows[name, s]['elapsed_s']} s" for s in ("dret", "torch") if (name, s) in rows]
        lines += ["", f"Elapsed: {', '.join(elapsed)}.", ""]
    if torch_note:
        lines.append(f"torch side skipped: {torch_note}.")
    lines += [f"{name} skipped: {SKIPPED[name]}." for name in names if name in SKIPPED]
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="all", help=f"all, or names from {', '.join([*WORKLOADS, *SKIPPED])}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per workload")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 wide on CPU, 1 warm-up + 2 timed steps")
    parser.add_argument("--out", help="append the markdown section to this file (default: stdout only)")
    parser.add_argument("--anchor", default=os.path.join(ANCHORS, "torch_contrastive.py"))
    parser.add_argument("--lengths", default=os.path.join(ANCHORS, "scifact_train_lengths.json"))
    parser.add_argument("--dret-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.names = [*WORKLOADS, *SKIPPED] if args.workload == "all" else args.workload.split(",")
    unknown = [n for n in args.names if n not in WORKLOADS and n not in SKIPPED]
    if unknown:
        parser.error(f"--workload: unknown {', '.join(unknown)}; expected all or names from "
                     f"{', '.join([*WORKLOADS, *SKIPPED])}")
    if args.tiny:
        args.steps, args.warmup = 2, 1
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup: expected at least 1 each (the first warm-up step compiles)")
    return args


def main() -> None:
    args = parse_args()
    if args.dret_child:
        (name,) = args.names
        w = sized(WORKLOADS[name], args.tiny)
        lengths = read_lengths(args.lengths) if w.real_lengths else None
        print(json.dumps(measure_dret(name, w, TINY_HF if args.tiny else BERT_BASE_HF, args.steps, args.warmup,
                                      lengths)), flush=True)
        return

    start = time.perf_counter()
    runnable = [n for n in args.names if n in WORKLOADS]
    torch_note = torch_skip_reason(args)
    rows = {}
    if torch_note is None:
        torch_rows = run_torch(list(dict.fromkeys(TORCH_NAME.get(n, n) for n in runnable)), args)
        rows.update({(n, "torch"): torch_rows[TORCH_NAME.get(n, n)] for n in runnable})
    else:
        print(f"[torch] skipped: {torch_note}", file=sys.stderr, flush=True)
    for name in runnable:
        began = time.perf_counter()
        row = dict(run_dret(name, args), elapsed_s=round(time.perf_counter() - began, 1))
        rows[name, "dret"] = row
        print(json.dumps(row), flush=True)
        print(f"[dret {name}] {row['elapsed_s']} s", file=sys.stderr, flush=True)
    chips = [f"{r['device']} x {r['devices']}" for r in rows.values() if r["system"] == "dret" and "device" in r]
    section = markdown(args.names, rows, torch_note, args, chips[0] if chips else "unknown")
    print(section)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + section)
    print(f"[total] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
