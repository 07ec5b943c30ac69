"""XLA:CPU compile options for inference: which library runs dots and reductions.

By default XLA:CPU hands dots, element-wise ops and reductions to YNNPACK. Its dot kernels are slow on
attention's [T, S] x [S, 32] products (about 50 GFLOP/s on the 2-core AVX-512 machine, against ~180 for XNNPACK's),
and its element-wise fusions are slower than XLA's own. XNNPACK dots + YNNPACK reductions encoded MiniLM about 8%
faster there when attention ran on XLA's ops (`bench/RESULTS_eval.md`), as it still does without the fused kernel
(`dret.models.cpu_kernels`); with the kernel the dense dots run as fast either way. The embeddings agree to 2e-7.
Only float32 compute uses them: XNNPACK's bfloat16 dots moved SciFact's NDCG@10 by 0.0025 from float32, against
0.0015 with XLA's defaults.
"""

import jax
import jax.numpy as jnp

CPU_INFERENCE_OPTIONS = {
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def inference_compiler_options(compute_dtype) -> dict | None:
    """`compiler_options` for an inference `jax.jit` on this backend (None: XLA's defaults)."""
    use = jax.default_backend() == "cpu" and jnp.dtype(compute_dtype) == jnp.float32
    return dict(CPU_INFERENCE_OPTIONS) if use else None
