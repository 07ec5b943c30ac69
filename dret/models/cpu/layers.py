"""CPU inference runs a layer block by block, so a block's [4T, 4D]-sized intermediates stay in cache."""

import jax
from flax import nnx

from dret.models.cpu.blocks import examples_per_step, map_examples

BLOCK_TOKENS = 1024  # tokens per block (per batch shard) when a layer runs block by block


def inference_layer(layer, x_btd, segments_bt, positions_bt):
    """`layer(x_btd, segments_bt, positions_bt, None)` over blocks of about BLOCK_TOKENS tokens, so a block's
    [4T, 4D]-sized intermediates stay in cache (faster encoding than whole batches or example-count blocks:
    `bench/RESULTS_eval.md`, "Measurements behind the code"). A block with no token (segments all 0: the empty rows
    that fill a packed batch) passes through unchanged. Training keeps whole-batch layers: its dropout masks are
    drawn batch-wide."""
    b, t = segments_bt.shape
    examples = max(1, BLOCK_TOKENS // t)
    if examples_per_step(b, examples) == b:
        return layer(x_btd, segments_bt, positions_bt, None)  # one block: the layer itself (qwix adds LoRA here)
    graphdef, state = nnx.split(layer)

    def block(x, m, p):
        return jax.lax.cond(m.any(), lambda: nnx.merge(graphdef, state)(x, m, p, None), lambda: x)
    return map_examples(block, (x_btd, segments_bt, positions_bt), examples)
