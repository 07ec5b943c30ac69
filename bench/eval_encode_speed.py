"""Encoder throughput probe: `Embedder.encode` on N SciFact docs at length 256, second call (compiles excluded).

Prints wall GFLOP/s and GFLOP per CPU-second x 2 ("cpu2", less distorted by other load on the 2 cores).
Usage: PYTHONPATH=. XLA_FLAGS=... python bench/eval_encode_speed.py [N] [BATCH]
"""

import json
import os
import sys
import time

import jax
import numpy as np

from dret.demo import bundled_minilm
from dret.model import Embedder

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir_scifact", "corpus.jsonl")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    with open(DATA) as f:
        docs = [json.loads(line) for line in f][1000:1000 + n]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    model = Embedder.from_pretrained(bundled_minilm())
    length_n = np.array([len(x) for x in model.tokenize(texts, 256)])
    d, ff, layers = 384, 1536, 6
    flops = layers * (2 * length_n * (4 * d * d + 2 * d * ff) + 4 * length_n ** 2 * d).sum()
    model.encode(texts, max_length=256, progress=False, batch_size=batch)  # compiles
    cpu, wall = time.process_time(), time.perf_counter()
    model.encode(texts, max_length=256, progress=False, batch_size=batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"n={n} batch={batch} devices={jax.device_count()} wall {flops / wall / 1e9:.0f} cpu2 "
          f"{flops / (cpu / 2) / 1e9:.0f} GFLOP/s  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


if __name__ == "__main__":
    main()
