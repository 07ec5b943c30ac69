"""XLA:CPU compile options for inference: which library runs dots and reductions.

By default XLA:CPU hands dots, element-wise ops and reductions to YNNPACK, whose dot kernels are slow on
attention's [T, S] x [S, head] products and whose element-wise fusions are slower than XLA's own: XNNPACK dots +
YNNPACK reductions encode faster where attention runs on XLA's ops (without the fused kernel of `kernels.py`); the
embeddings agree to 2e-7. Only float32 compute uses them: XNNPACK's bfloat16 dots move SciFact's NDCG@10 further
from float32 than XLA's defaults. Figures: `bench/RESULTS_eval.md`, "Measurements behind the code".
"""

import jax.numpy as jnp

INFERENCE_OPTIONS = {
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def inference_options(compute_dtype) -> dict | None:
    """XLA:CPU `compiler_options` for an inference `jax.jit` computing in `compute_dtype` (None: XLA's defaults)."""
    return dict(INFERENCE_OPTIONS) if jnp.dtype(compute_dtype) == jnp.float32 else None
