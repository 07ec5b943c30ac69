"""Everything that runs only on XLA:CPU, behind one seam: the fused attention kernel (`attention.cc`, built by
`kernels.py`), cache-blocked loops over examples (`blocks.py`, `attention.py`, `layers.py`) and XLA:CPU compile
options (`xla_options.py`). Callers ask `active()` and call the functions below; without this package the
accelerator paths run everywhere."""

import jax

from dret.models.cpu.attention import dot_product_attention
from dret.models.cpu.layers import BLOCK_TOKENS, inference_layer
from dret.models.cpu.xla_options import inference_options

__all__ = ["active", "dot_product_attention", "inference_layer", "compiler_options", "encode_row_tokens"]


def active() -> bool:
    """Whether computations trace for XLA:CPU: the one place dret asks for the CPU backend."""
    return jax.default_backend() == "cpu"


def compiler_options(compute_dtype) -> dict | None:
    """`compiler_options` for an inference `jax.jit` computing in `compute_dtype` (None: XLA's defaults)."""
    return inference_options(compute_dtype) if active() else None


def encode_row_tokens(max_length: int) -> int:
    """Tokens per packed encode row: one layer block on CPU, else one text of `max_length`."""
    return BLOCK_TOKENS if active() else max_length
