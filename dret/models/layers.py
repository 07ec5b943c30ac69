"""The layer stack of every model family: dropout streams and rematerialisation in training, CPU blocking in
inference. A layer is called as `layer(x_btd, segments_bt, positions_bt, dropout_rng)` (dropout_rng None:
deterministic; positions are each token's position in its text, for families that rotate by position)."""

import jax
from flax import nnx

from dret.models import cpu
from dret.models.logical import constrain


ACTIVATION_AXES = ("batch", "length", "embed")  # logical axes of the hidden states between layers (every family)


def run_layers(layers, x_btd, segments_bt, positions_bt, dropout_rng: jax.Array | None, *, remat: bool):
    """x_btd through each layer in turn, laid out as ACTIVATION_AXES after each. Layer i draws its dropout
    from fold_in(dropout_rng, i); with `remat` its activations are recomputed in the backward pass. Inference
    (dropout_rng None) runs each layer block by block on CPU (`dret.models.cpu.inference_layer`)."""
    for i, layer in enumerate(layers):
        if dropout_rng is None:
            x_btd = (cpu.inference_layer(layer, x_btd, segments_bt, positions_bt) if cpu.active()
                     else layer(x_btd, segments_bt, positions_bt, None))
        else:
            rng = jax.random.fold_in(dropout_rng, i)
            x_btd = (_rematerialised(layer, x_btd, segments_bt, positions_bt, rng) if remat
                     else layer(x_btd, segments_bt, positions_bt, rng))
        x_btd = constrain(x_btd, ACTIVATION_AXES)
    return x_btd


def _rematerialised(layer, x_btd, segments_bt, positions_bt, rng):
    """The layer under jax.checkpoint as a pure function of its state (so LoRA adapters work inside it)."""
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(lambda s, x, m, p, r: nnx.merge(graphdef, s)(x, m, p, r))(
        state, x_btd, segments_bt, positions_bt, rng)
