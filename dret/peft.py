"""What trains, chosen by variable type: sft (every Param), bitfit (biases), lora (qwix `nnx.LoRAParam`); under
bitfit and lora also the embedding rows of added tokens (`dret.models.added_tokens`), which have nothing to learn
from otherwise."""

from __future__ import annotations

import jax.numpy as jnp
import qwix
from flax import nnx

from dret import models
from dret.models.added_tokens import is_added

FINE_TUNE_TYPES = ("sft", "lora", "bitfit")


def _is_bias(path, value) -> bool:
    return isinstance(value, nnx.Param) and path[-1] == "bias"


def trainable(fine_tune_type: str):
    """The nnx filter of the variables the optimizer updates."""
    return {"sft": nnx.Param, "lora": nnx.Any(nnx.LoRAParam, is_added),
            "bitfit": nnx.Any(_is_bias, is_added)}[fine_tune_type]


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float, target_modules, seed: int,
               example_len: int = 8) -> nnx.Module:
    """Adds adapters (A: he-uniform, B: zeros, delta scaled alpha/rank) to the named Linear modules.

    LoRA dropout draws from the modules' `qwix_rngs`, which the train step sets to a fresh stream keyed by the
    step's rng (`with_lora_rng`), so dropout masks depend only on (seed, step) and no rng lives in the state.
    """
    pattern = r".*/(" + "|".join(target_modules) + r")"
    provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=float(alpha), dropout=dropout)
    ids_bt = jnp.ones((1, example_len), jnp.int32)  # one example
    # Adapters are created on the modules the init call runs; a rematerialised (or, on CPU, blocked) layer runs
    # on a copy. One example is a single block, so the layers run themselves.
    remat = getattr(model, "remat", False)
    model.set_attributes(remat=False, raise_if_not_found=False)
    model = qwix.apply_lora_to_model(model, provider, ids_bt, ids_bt, rngs=nnx.Rngs(seed))
    model.set_attributes(remat=remat, raise_if_not_found=False)
    return model


def split_trainable(model: nnx.Module, hf_config: dict, config):
    """(graphdef, trainable state, frozen state) of a backbone, with LoRA adapters added when configured (on
    lora_target_modules, or the model family's default targets when that is empty)."""
    if config.fine_tune_type == "lora":
        targets = tuple(config.lora_target_modules) or models.family_of(hf_config).LORA_TARGETS
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=targets, seed=config.seed)
    return nnx.split(model, trainable(config.fine_tune_type), ...)


def with_lora_rng(model: nnx.Module, key) -> nnx.Module:
    """Gives every LoRA adapter one dropout stream keyed by `key` (a no-op without adapters)."""
    model.set_attributes(qwix_rngs=nnx.Rngs(dropout=key), raise_if_not_found=False)
    return model


def merged_params(model: nnx.Module, *, rank: int, alpha: float) -> nnx.State:
    """Plain Params with each adapter folded in: kernel + A @ B * alpha / rank (for export and eval)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    merged = {}
    for path, var in flat.items():
        if isinstance(var, nnx.LoRAParam):
            continue
        value = var.get_value()
        a = flat.get(path[:-1] + (f"{path[-1]}_lora_a",))
        if a is not None:
            b = flat[path[:-1] + (f"{path[-1]}_lora_b",)]
            value = value + (a.get_value() @ b.get_value()) * (alpha / rank)
        merged[path] = nnx.Param(value)
    return nnx.from_flat_state(merged)
