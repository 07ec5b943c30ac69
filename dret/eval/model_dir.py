"""`--model`: an HF / export folder or a dret training output_dir -> a lazy Embedder loader and a cache key."""

from __future__ import annotations

import os

import jax.numpy as jnp

from dret import hf_io, inference, tokens
from dret.errors import DretError
from dret.eval import cache
from dret.model import Embedder
from dret.resources import check_model_type, model_dir, resolve_model


def _tokenizer_options(embedder, pad_token, add_bos_token, add_eos_token, source):
    """The reference's tokenizer switches on top of the model's own (None: unchanged)."""
    embedder.tokenizer = tokens.configure(embedder.tokenizer, pad_token=pad_token or "",
                                          add_bos_token=-1 if add_bos_token is None else add_bos_token,
                                          add_eos_token=-1 if add_eos_token is None else add_eos_token, source=source)
    return embedder


def resolve(path: str, *, pooling: str | None = None, dtype: str | None = None, step: int | None = None,
            pad_token: str | None = None, add_bos_token: int | None = None, add_eos_token: int | None = None,
            allow_pickle: bool = False, model_type: str | None = None, flag: str = "--model"):
    """(load() -> Embedder, cache key of the weights and every option that changes vectors, the model's own
    instructions by role: its sentence-transformers prompts, or those the run trained with); `model_type` (the
    reference's flag) is checked against the model's config.json; `flag` names the path in errors."""
    if not os.path.isdir(path):
        raise DretError(f"{flag} {path} does not exist")
    extra = (pad_token, add_bos_token, add_eos_token)
    options = dict(pooling=pooling, dtype=dtype, pad_token=pad_token, add_bos_token=add_bos_token,
                   add_eos_token=add_eos_token)
    if os.path.isfile(os.path.join(path, "config.json")):
        hf_io.check_tokenizer_files(path)  # before any data is read: without them, every word is [UNK]
        if model_type:
            check_model_type(model_type, hf_io.read_config(path), os.path.join(path, "config.json"), "--model_type")

        def load():
            return _tokenizer_options(Embedder.from_pretrained(path, pooling=pooling, dtype=dtype,
                                                                allow_pickle=allow_pickle), *extra, path)
        return load, cache.key(weights=cache.folder_fingerprint(path), **options), hf_io.read_prompts(path)
    if os.path.isdir(os.path.join(path, inference.CHECKPOINTS)):
        steps = inference.saved_steps(path)
        step = step if step is not None else (steps[-1] if steps else None)

        def load():
            embedder = inference.run_embedder(path, step, dtype=jnp.dtype(dtype or "float32"))  # LoRA merged
            embedder.pooling = pooling or embedder.pooling
            return _tokenizer_options(embedder, *extra, path)
        if step not in steps:
            return load, None, {}  # load() says which steps there are
        config = inference.run_config(path, step)
        if model_type:
            source = resolve_model(config)
            check_model_type(model_type, source.hf, os.path.join(source.folder, "config.json"), "--model_type")
        # LoRA and bitfit checkpoints hold only what trained: the base model's files are part of the weights.
        base = model_dir(config)
        weights = [cache.folder_fingerprint(os.path.join(path, inference.CHECKPOINTS, str(step)))]
        weights += ([cache.folder_fingerprint(base)] if base and os.path.isdir(base) else
                    [cache.file_fingerprint(base)] if base and os.path.isfile(base) else [])  # a GGUF base
        return load, cache.key(weights=weights, step=step, **options), inference.prompts_of(config)
    raise DretError(f"{flag} {path}: neither an HF model folder (config.json) nor a dret training output_dir "
                    "(checkpoints/)")
