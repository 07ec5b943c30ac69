"""Backbones: model code names logical axes only and knows nothing of meshes or losses.

The registry: an HF config dict -> its family module (one file per family, e.g. `bert`), which owns its model
types, config, HF key table, LoRA module names and token conventions; `config_of` and `build` ask it.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from dret.errors import DretError
from dret.models import bert, llama, nvembed

FAMILIES = (bert, llama, nvembed)


def family_of(hf: dict, source: str = "config.json"):
    """The family module of an HF config dict: by `model_type`, or, where that is missing, by a class name in
    `architectures`; a DretError naming `source` for a model we do not support."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") if model_type is None else None
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES or (
                isinstance(architectures, list) and any(a in family.HF_CLASSES.values() for a in architectures)):
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.MODEL_TYPES)
    if model_type is None:
        raise DretError(f"{source}: missing model_type: expected one of {supported} (supported model_type)")
    raise DretError(f"{source}: model_type: expected one of {supported} (supported model_type), got {model_type!r:.80}")


def family_of_gguf(architecture, source: str):
    """The family module that reads GGUF files of this `general.architecture`; a DretError naming `source` else."""
    for family in FAMILIES:
        if architecture in family.GGUF_ARCHITECTURES:
            return family
    supported = ", ".join(a for family in FAMILIES for a in family.GGUF_ARCHITECTURES)
    raise DretError(f"{source}: general.architecture: expected one of {supported} (supported GGUF architectures), "
                    f"got {architecture!r:.80}")


def family_of_paddle(class_name, model_type, source: str):
    """(family module, HF model_type) of a PaddleNLP config: by its `model_type`, or by its class name
    (`ErnieModel`, `ErnieForSequenceClassification`, ...); a DretError naming `source` for one we do not read."""
    for family in FAMILIES:
        for stem, hf_type in family.PADDLE_CLASSES.items():
            if model_type == hf_type or (isinstance(class_name, str)
                                         and re.fullmatch(rf"{stem}(Model|For[A-Z]\w*)", class_name)):
                return family, hf_type
    stems = ", ".join(f"{stem}Model" for family in FAMILIES for stem in family.PADDLE_CLASSES)
    raise DretError(f"{source}: architectures / init_class: expected a PaddleNLP class of {stems} (or their For* "
                    f"task models), got {class_name!r:.80} (model_type {model_type!r:.40})")


def config_of(hf: dict, source: str = "config.json"):
    """The family's validated config of an HF config dict (`hidden_size`, `vocab_size`, `max_text_length`, ...)."""
    return family_of(hf, source).config_of(hf, source)


def text_config(hf: dict) -> dict:
    """The HF config dict of the transformer itself (`num_hidden_layers`, `hidden_size`, `vocab_size`, ...): NV-Embed's
    `text_config`, every other model's whole config."""
    return hf["text_config"] if hf.get("model_type") in nvembed.MODEL_TYPES else hf


def with_text_config(hf: dict, text: dict) -> dict:
    """`hf` with `text` as its transformer's config (see `text_config`)."""
    return {**hf, "text_config": text} if hf.get("model_type") in nvembed.MODEL_TYPES else text


def stand_in_config(hf: dict, model_type: str) -> dict:
    """The HF config dict of a tiny run's `model_type` from its bundled stand-in's config `hf` (NV-Embed: the
    stand-in decoder as its text_config; `tiny` then sizes the latent block)."""
    if model_type in nvembed.MODEL_TYPES:
        return {"model_type": model_type, "text_config": {**hf, "model_type": "mistral"},
                "latent_attention_config": {}}
    return {**hf, "model_type": model_type}


def masks_instruction(hf: dict) -> bool:
    """Whether the model leaves a text's instruction tokens out of its pooled mean (NV-Embed's `is_mask_instruction`,
    on unless config.json says false)."""
    return hf.get("model_type") in nvembed.MODEL_TYPES and hf.get("is_mask_instruction", True) is not False


def tiny(hf: dict) -> dict:
    """`hf` shrunk to its family's TINY shape (a nested config, as NV-Embed's text_config, updated key by key)."""
    return {**hf, **{k: {**hf[k], **v} if isinstance(v, dict) else v for k, v in family_of(hf).TINY.items()}}


def build(hf: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    """The backbone an HF config dict describes, with freshly initialised weights (under `nnx.eval_shape`: none)."""
    family = family_of(hf)
    return family.build(family.config_of(hf), dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
