"""The benchmark scripts run: their --tiny CPU mode is the same code the accelerator run uses."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_throughput_tiny_runs_on_cpu():
    """One workload (the real-length one: its batches vary in real tokens): each dret workload is its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # XLA_FLAGS / JAX_PLATFORMS as the tests have them
    done = subprocess.run([sys.executable, "bench/train_throughput.py", "--tiny", "--workload", "bert-base-reallen"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["workload"], r["system"]) for r in rows] == [("bert-base-reallen", "dret")]
    for row in rows:
        assert row["examples_per_s"] > 0 and row["model_tflops_per_s"] > 0 and math.isfinite(row["loss"]), row
    assert "torch side skipped: --tiny runs on CPU" in done.stdout
