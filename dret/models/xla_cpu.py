"""XLA:CPU compile options for inference: which library runs dots and reductions.

By default XLA:CPU hands dots, element-wise ops and reductions to YNNPACK. Its dot kernels are slow on
attention's [T, S] x [S, 32] products (about 50 GFLOP/s on the 2-core AVX-512 machine, against ~180 for XNNPACK's),
and its element-wise fusions are slower than XLA's own. XNNPACK dots + YNNPACK reductions encode MiniLM about 8%
faster there (`bench/RESULTS_eval.md`); the embeddings agree to 2e-7.
"""

import jax

CPU_INFERENCE_OPTIONS = {
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def inference_compiler_options() -> dict | None:
    """`compiler_options` for an inference `jax.jit` on this backend (None: XLA's defaults)."""
    return dict(CPU_INFERENCE_OPTIONS) if jax.default_backend() == "cpu" else None
