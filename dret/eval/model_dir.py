"""`--model`: an HF / export folder or a dret training output_dir -> a lazy Embedder loader and a cache key."""

from __future__ import annotations

import os

from dret.errors import DretError
from dret.eval import cache


def _tokenizer_options(embedder, pad_token, padding_side, add_bos_token, add_eos_token):
    """The reference's tokenizer switches; left padding needs pooling support we do not have for encoders."""
    tok = embedder.tokenizer
    if pad_token:
        tok.pad_token = pad_token
    if padding_side not in (None, "right"):
        raise DretError(f"--padding_side {padding_side}: only right padding is supported by dret encoders yet")
    for name, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
        if value is not None:
            if not hasattr(tok, name):
                raise DretError(f"--{name}: the tokenizer of this model has no {name} switch")
            setattr(tok, name, bool(value))
    return embedder


def resolve(path: str, *, pooling: str | None = None, dtype: str | None = None, step: int | None = None,
            pad_token: str | None = None, padding_side: str | None = None, add_bos_token: int | None = None,
            add_eos_token: int | None = None, allow_pickle: bool = False):
    """(load() -> Embedder, cache key of the weights and every option that changes vectors)."""
    if not os.path.isdir(path):
        raise DretError(f"--model {path} does not exist")
    extra = (pad_token, padding_side, add_bos_token, add_eos_token)
    options = dict(pooling=pooling, dtype=dtype, pad_token=pad_token, padding_side=padding_side,
                   add_bos_token=add_bos_token, add_eos_token=add_eos_token)
    if os.path.isfile(os.path.join(path, "config.json")):
        def load():
            from dret.model import Embedder
            return _tokenizer_options(Embedder.from_pretrained(path, pooling=pooling, dtype=dtype,
                                                                allow_pickle=allow_pickle), *extra)
        return load, cache.key(weights=cache.folder_fingerprint(path), **options)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from dret.checkpoint import Checkpointer
        from dret.export import load_checkpoint

        steps = Checkpointer(os.path.join(path, "checkpoints"), max_to_keep=None).all_steps()
        step = step if step is not None else (max(steps) if steps else None)

        def load():
            from dret.trainer import inference_embedder  # LoRA merged, float32
            embedder = inference_embedder(*load_checkpoint(path, step)[:4])
            embedder.pooling = pooling or embedder.pooling
            return _tokenizer_options(embedder, *extra)
        step_dir = os.path.join(path, "checkpoints", str(step))
        weights = cache.folder_fingerprint(step_dir) if os.path.isdir(step_dir) else None
        return load, (cache.key(weights=weights, step=step, **options) if weights else None)
    raise DretError(f"--model {path}: neither an HF model folder (config.json) nor a dret training output_dir "
                    "(checkpoints/)")
