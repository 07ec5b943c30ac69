"""`--model`: an HF / export folder or a dret training output_dir -> a lazy Embedder loader and a cache key."""

from __future__ import annotations

import os

import jax.numpy as jnp

from dret import hf_io, inference, models
from dret.errors import DretError
from dret.eval import cache
from dret.model import Embedder
from dret.resources import model_dir, resolve_model


def _tokenizer_options(embedder, pad_token, add_bos_token, add_eos_token):
    """The reference's tokenizer switches."""
    tok = embedder.tokenizer
    if pad_token:
        tok.pad_token = pad_token
    for name, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
        if value is not None:
            if not hasattr(tok, name):
                raise DretError(f"--{name}: the tokenizer of this model has no {name} switch")
            setattr(tok, name, bool(value))
    return embedder


def _check_model_type(model_type: str, hf: dict, source: str) -> None:
    """The reference's --model_type: dret reads the type from config.json, so it may only agree with it."""
    family = models.family_of(hf, source)
    if models.family_of({"model_type": model_type}, "--model_type") is not family:
        raise DretError(f"--model_type {model_type} contradicts {source}: its model_type is "
                        f"{hf.get('model_type')!r} (family {family.__name__.rsplit('.', 1)[-1]})")


def resolve(path: str, *, pooling: str | None = None, dtype: str | None = None, step: int | None = None,
            pad_token: str | None = None, add_bos_token: int | None = None, add_eos_token: int | None = None,
            allow_pickle: bool = False, model_type: str | None = None, flag: str = "--model"):
    """(load() -> Embedder, cache key of the weights and every option that changes vectors); `model_type` (the
    reference's flag) is checked against the model's config.json; `flag` names the path in errors."""
    if not os.path.isdir(path):
        raise DretError(f"{flag} {path} does not exist")
    extra = (pad_token, add_bos_token, add_eos_token)
    options = dict(pooling=pooling, dtype=dtype, pad_token=pad_token, add_bos_token=add_bos_token,
                   add_eos_token=add_eos_token)
    if os.path.isfile(os.path.join(path, "config.json")):
        hf_io.check_tokenizer_files(path)  # before any data is read: without them, every word is [UNK]
        if model_type:
            _check_model_type(model_type, hf_io.read_config(path), os.path.join(path, "config.json"))

        def load():
            return _tokenizer_options(Embedder.from_pretrained(path, pooling=pooling, dtype=dtype,
                                                                allow_pickle=allow_pickle), *extra)
        return load, cache.key(weights=cache.folder_fingerprint(path), **options)
    if os.path.isdir(os.path.join(path, inference.CHECKPOINTS)):
        steps = inference.saved_steps(path)
        step = step if step is not None else (steps[-1] if steps else None)

        def load():
            embedder = inference.run_embedder(path, step, dtype=jnp.dtype(dtype or "float32"))  # LoRA merged
            embedder.pooling = pooling or embedder.pooling
            return _tokenizer_options(embedder, *extra)
        if step not in steps:
            return load, None  # load() says which steps there are
        config = inference.run_config(path, step)
        if model_type:
            source = resolve_model(config)
            _check_model_type(model_type, source.hf, os.path.join(source.folder, "config.json"))
        # LoRA and bitfit checkpoints hold only what trained: the base model's files are part of the weights.
        base = model_dir(config)
        weights = [cache.folder_fingerprint(os.path.join(path, inference.CHECKPOINTS, str(step)))]
        weights += [cache.folder_fingerprint(base)] if base and os.path.isdir(base) else []
        return load, cache.key(weights=weights, step=step, **options)
    raise DretError(f"{flag} {path}: neither an HF model folder (config.json) nor a dret training output_dir "
                    "(checkpoints/)")
