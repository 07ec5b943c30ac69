"""A/B of encode speed on this machine: the code at git rev BEFORE against this working tree.

Each run is a fresh process with PYTHONPATH set to one tree: the bundled MiniLM encodes a tenth of the first N
SciFact passages to compile (full batches, which carry nearly all the work, have one shape), then all N, timed,
in float32 at its max length (256). Runs alternate (ABAB...), so a change in machine load hits both sides alike.
Prints docs/s per run by wall time and by CPU time (process time / cores: less distorted by other load on a
shared machine), the medians and their ratios (after/before); --append adds them as a dated section to a
markdown file. About 60 s a run at 2,000 passages on the 2-core machine when idle.
Usage: python bench/encode_ab.py --before 391a242 [--rounds 3] [--docs 2000] [--append bench/RESULTS_eval.md]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "data", "beir_scifact", "corpus.jsonl")

# Runs in the child, with the tree under test first on sys.path.
CHILD = """
import json, os, sys, time
import dret
from dret.model import Embedder
from dret.resources import bundled_minilm

tree, corpus, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert dret.__file__.startswith(tree), (dret.__file__, tree)
with open(corpus) as f:
    docs = [json.loads(line) for _, line in zip(range(n), f)]
texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
model = Embedder.from_pretrained(bundled_minilm())
model.encode(texts[:n // 10], progress=False)  # compiles
wall, cpu = time.perf_counter(), time.process_time()
model.encode(texts, progress=False)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"wall": n / wall, "cpu": n / (cpu / len(os.sched_getaffinity(0)))}))
"""


def export_rev(rev: str) -> str:
    """The tree of `rev` (git archive, no change to the repository), extracted once under the temp dir."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    out = os.path.join(tempfile.gettempdir(), f"dret_ab_{sha}")
    if not os.path.isdir(out):
        tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        os.replace(tmp, out)
    return out


def run_once(tree: str, docs: int) -> dict:
    """{"wall": docs/s, "cpu": docs/s} of one fresh process encoding with `tree`'s dret."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env.update(PYTHONPATH=tree, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, tree + os.sep, CORPUS, str(docs)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"encode run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git rev of the 'before' side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--append", help="markdown file to append the figures to")
    args = parser.parse_args()
    trees = {"before": export_rev(args.before), "after": ROOT}
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            runs[side].append(run_once(trees[side], args.docs))
            print(f"round {r + 1} {side:6s} {runs[side][-1]['wall']:6.1f} docs/s wall, "
                  f"{runs[side][-1]['cpu']:6.1f} by CPU time", flush=True)
    median = {(side, k): statistics.median(run[k] for run in v) for side, v in runs.items() for k in ("wall", "cpu")}
    ratio = {k: median["after", k] / median["before", k] for k in ("wall", "cpu")}
    print(f"after/before: wall {ratio['wall']:.3f}, CPU time {ratio['cpu']:.3f}")
    if args.append:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        rows = "\n".join(f"| {side} | {k} | {' / '.join(f'{run[k]:.1f}' for run in v)} | {median[side, k]:.1f} |"
                         for k in ("wall", "cpu") for side, v in runs.items())
        with open(args.append, "a") as f:
            f.write(f"\n## Encode A/B, {datetime.date.today()} (`python bench/encode_ab.py --before {args.before}"
                    f" --rounds {args.rounds} --docs {args.docs}`)\n\nbefore = {args.before}, after = the working "
                    f"tree on {head}. MiniLM fp32, the first {args.docs} SciFact passages at max 256, encoded after a "
                    f"compiling warm-up, runs alternating in fresh processes; docs/s by wall time and by CPU time "
                    f"/ cores.\n\n| side | clock | docs/s per round | median |\n|---|---|---|---|\n{rows}\n\n"
                    f"after/before (medians): wall {ratio['wall']:.3f}, CPU time {ratio['cpu']:.3f}\n")


if __name__ == "__main__":
    main()
