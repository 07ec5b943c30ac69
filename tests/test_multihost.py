"""Two real processes on localhost (jax.distributed, CPU devices, gloo) train like one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from dret import data
from dret.trainer import train_and_evaluate
from tests.train_util import ROOT, train_command, tiny_config

# Runs dret.train, recording the query ids of every batch this process reads.
WORKER = """
import runpy, sys
import numpy as np
from dret import data
read, batch = [], data.TrainData.batch
data.TrainData.batch = lambda self, epoch, step: read.append(batch(self, epoch, step)) or read[-1]
out, sys.argv = sys.argv[1], ["dret.train", *sys.argv[2:]]
try:
    runpy.run_module("dret.train", run_name="__main__")
finally:
    np.save(out, np.stack([b["query_ids"] for b in read]))
"""


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(output_dir, "metrics.jsonl"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=3, negatives_cross_device=True)  # 8 devices x 1 query
    read, batch = [], data.TrainData.batch
    monkeypatch.setattr(data.TrainData, "batch",
                        lambda self, epoch, step: read.append(batch(self, epoch, step)) or read[-1])
    train_and_evaluate(config)
    global_ids = np.stack([b["query_ids"] for b in read])  # [3, 8, T]

    config.output_dir, config.per_device_train_batch_size = str(tmp_path / "two"), 2  # 2 processes x 2 devices x 2
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "DRET_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "DRET_NUM_PROCESSES": "2"}
    flags = train_command(config)[3:]  # --config ... --config.x=y
    # Each worker writes to its own file: a pipe left undrained while waiting on the other worker fills up and
    # blocks that worker inside a collective, which hangs both.
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"read{i}.npy"), *flags],
                                            cwd=ROOT, env={**env, "DRET_PROCESS_ID": str(i)}, stdout=out,
                                            stderr=subprocess.STDOUT))
    try:
        for w in workers:
            w.wait(timeout=300)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], "".join(log.read_text()[-3000:] for log in logs)

    np.testing.assert_allclose(losses(config.output_dir), losses(tiny_config(tmp_path).output_dir), rtol=1e-5)
    read0, read1 = np.load(tmp_path / "read0.npy"), np.load(tmp_path / "read1.npy")  # [3, 4, T] each
    np.testing.assert_array_equal(np.concatenate([read0, read1], axis=1), global_ids)
    assert not any((row == other).all() for step in range(3) for row in read0[step] for other in read1[step])
    assert sorted(os.listdir(os.path.join(config.output_dir, "checkpoints"))) == ["2", "3"]
    assert os.path.exists(os.path.join(config.output_dir, "export", "model.safetensors"))
