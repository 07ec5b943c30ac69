"""A/B of training losses: the code at git rev BEFORE against this working tree, on the same tiny runs.

Each side is a fresh process (PYTHONPATH = its tree, 8 fake CPU devices) training four 6-step runs with the test
suite's tiny config: plain, stage3 with cross-device negatives on a (1, 8, 1) mesh, LoRA with gradient
accumulation 2, and the bundled MiniLM under stage3. Prints each run's per-step losses and whether the two sides
are bit-identical. About 3 minutes on the 2-core machine.
Usage: python bench/loss_ab.py --before 391a242
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from encode_ab import ROOT, export_rev

# Runs in the child, with the tree under test first on sys.path.
CHILD = """
import json, os, pathlib, sys
import dret
from dret.trainer import train_and_evaluate
from tests.train_util import tiny_config

tree, out = sys.argv[1], pathlib.Path(sys.argv[2])
assert dret.__file__.startswith(tree), (dret.__file__, tree)
cases = {"plain": {}, "stage3": {"sharding": "stage3", "negatives_cross_device": True},
         "lora_accumulation2": {"fine_tune_type": "lora", "lora_rank": 4, "gradient_accumulation_steps": 2,
                                "lora_target_modules": ("query", "key", "value")},
         "minilm_stage3": {"tiny": False, "model_name_or_path": "bundled:all-MiniLM-L6-v2", "sharding": "stage3"}}
losses = {}
for name, overrides in cases.items():
    c = tiny_config(out / name, max_steps=6, save_steps=100, logging_steps=1, **overrides)
    if "stage3" in name:
        c.mesh.data, c.mesh.fsdp = 1, 8
    train_and_evaluate(c)
    losses[name] = [json.loads(line)["loss"] for line in open(os.path.join(c.output_dir, "metrics.jsonl"))]
print(json.dumps(losses))
"""


def losses_of(tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, tree + os.sep, out], env=env, cwd=tree,
                              capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git rev of the 'before' side")
    args = parser.parse_args()
    before, after = losses_of(export_rev(args.before)), losses_of(ROOT)
    for name in before:
        same = "bit-identical" if before[name] == after[name] else "DIFFERENT"
        print(f"{name}: {same}; before {before[name]}; after {after[name]}")


if __name__ == "__main__":
    main()
