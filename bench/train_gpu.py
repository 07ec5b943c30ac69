"""Training throughput on one accelerator: dret's train step on the PyTorch reference's workload.

The workload of `../shared/anchors/torch_contrastive.py` (bert-base-seed / bert-base-norecompute): BERT-base
shape (vocab 18k, 12 x 768), random weights, batch 64 x group 4, query 32 / passage 512 tokens (all real),
CLS pooling, temperature 0.02, bf16 compute with float32 master weights, AdamW. Built from the trainer's own
pieces (precision, optimizer, sharded state, jitted step); only the data is synthetic. One JSON line per run,
with the anchor's keys.

    python bench/train_gpu.py [--recompute] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dret import peft  # noqa: E402
from dret import models  # noqa: E402
from dret.sharding import batch_sharding, make_mesh  # noqa: E402
from dret.train_step import create_state, make_optimizer, make_step, precision  # noqa: E402
from ml_configs import base  # noqa: E402

BERT_BASE_HF = dict(model_type="bert", vocab_size=18000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=2048)
BERT_BASE = models.config_of(BERT_BASE_HF)
BATCH, GROUP, QUERY_LEN, PASSAGE_LEN = 64, 4, 32, 512


def model_flops(n_dense_params: int) -> float:
    """The anchor's count: 6*N*tokens for the dense weights plus 12*L*d*S^2 per sequence (fwd + bwd)."""
    cfg = BERT_BASE
    tokens = BATCH * QUERY_LEN + BATCH * GROUP * PASSAGE_LEN
    attention = sum(12 * cfg.num_hidden_layers * cfg.hidden_size * s * s * n
                    for s, n in ((QUERY_LEN, BATCH), (PASSAGE_LEN, BATCH * GROUP)))
    return 6 * n_dense_params * tokens + attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    config = base.get_config()
    config.bf16, config.recompute, config.sentence_pooling_method = True, args.recompute, "cls"
    config.per_device_train_batch_size, config.train_group_size, config.temperature = BATCH, GROUP, 0.02
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    dtype, param_dtype = precision(config)
    backbone = models.build(BERT_BASE_HF, dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                            rngs=nnx.Rngs(config.seed))
    graphdef, params, frozen = peft.split_trainable(backbone, BERT_BASE_HF, config)
    tx, _ = make_optimizer(config, total_steps=1000)
    state, shardings = create_state(params, frozen, tx, mesh, config)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, BERT_BASE.hidden_size)

    rng = np.random.default_rng(0)
    host = {"query_ids": rng.integers(0, BERT_BASE.vocab_size, (BATCH, QUERY_LEN), dtype=np.int32),
            "passage_ids": rng.integers(0, BERT_BASE.vocab_size, (BATCH * GROUP, PASSAGE_LEN), dtype=np.int32)}
    host["query_mask"], host["passage_mask"] = (np.ones_like(host[k]) for k in ("query_ids", "passage_ids"))
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in host.items()}

    start = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = step_fn(state, batch, step_config)
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step_fn(state, batch, step_config)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / args.steps

    dense = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))
                if "embeddings" not in jax.tree_util.keystr(path))
    tokens = BATCH * QUERY_LEN + BATCH * GROUP * PASSAGE_LEN
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps(dict(
        workload="bert-base-" + ("seed" if args.recompute else "norecompute"), system="dret",
        batch=BATCH, group=GROUP, qlen=QUERY_LEN, plen=PASSAGE_LEN, recompute=args.recompute,
        step_s=round(step_s, 4), examples_per_s=round(BATCH / step_s, 1), tokens_per_s=round(tokens / step_s),
        model_tflops_per_s=round(model_flops(dense) / step_s / 1e12, 1),
        peak_mem_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 1), warmup_s=round(warmup_s, 1),
        loss=round(float(metrics["loss"]), 4), jax=jax.__version__, device=jax.devices()[0].device_kind)),
        flush=True)


if __name__ == "__main__":
    main()
