"""Embedder = backbone + pooling + optional L2 normalisation, and its batched, packed `encode`."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dret import hf_io
from dret.errors import DretError
from dret.eval import encode as encode_lib
from dret.models.bert import CPU_BLOCK_TOKENS
from dret.models.logical import activation_rules
from dret.models.xla_cpu import inference_compiler_options

POOLING_METHODS = ("cls", "mean", "last", "last_8")
DEFAULT_MAX_LENGTH = 512


def pool_weights(positions_bt: jax.Array, lengths_bt: jax.Array, method: str) -> jax.Array:
    """Each token's weight [B, T] in its text's vector, from its position in the text and the text's length
    (0 where no text is): cls the first token, mean all, last the last, last_8 the last 8 equally."""
    real_bt = positions_bt < lengths_bt
    n_bt = jnp.maximum(lengths_bt, 1).astype(jnp.float32)
    if method == "cls":
        w_bt = positions_bt == 0
    elif method == "mean":
        w_bt = 1.0 / n_bt
    elif method in ("last", "last_8"):
        n_last = 1 if method == "last" else 8
        w_bt = (positions_bt >= lengths_bt - n_last) / jnp.minimum(n_bt, n_last)
    else:
        raise ValueError(f"pooling {method!r}: expected one of {', '.join(POOLING_METHODS)}")
    return jnp.where(real_bt, w_bt, 0.0).astype(jnp.float32)


def pool(h_btd: jax.Array, mask_bt: jax.Array, method: str) -> jax.Array:
    """Hidden states [B, T, D] of right-padded rows (one text each) -> sentence vectors [B, D] in float32."""
    positions_bt = jnp.arange(h_btd.shape[1])[None, :]
    w_bt = pool_weights(positions_bt, mask_bt.astype(jnp.int32).sum(1, keepdims=True), method)
    return (h_btd.astype(jnp.float32) * w_bt[..., None]).sum(1)


def finish(v_bd: jax.Array, *, normalize: bool, dim: int | None) -> jax.Array:
    """Matryoshka truncation to `dim`, then L2 normalisation."""
    if dim is not None:
        v_bd = v_bd[..., :dim]
    if normalize:
        v_bd = v_bd / jnp.maximum(jnp.linalg.norm(v_bd, axis=-1, keepdims=True), 1e-12)
    return v_bd


_ST_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last"}  # sentence-transformers 6 `pooling_mode`
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_lasttoken": "last"}  # sentence-transformers 5


def _read_sentence_transformers(path: str) -> tuple[str | None, int | None]:
    """(pooling, max_seq_length) from a sentence-transformers folder (5.x or 6.x layout), None where it says nothing."""
    pooling = max_len = None
    modules_file = os.path.join(path, "modules.json")
    if os.path.isfile(modules_file):
        for i, module in enumerate(hf_io.read_json(modules_file, list)):
            if not (isinstance(module, dict) and isinstance(module.get("type"), str)):
                raise DretError(f"{modules_file}: entry {i}: expected an object with a \"type\", got {module!r:.80}")
            if module["type"].endswith("Pooling"):
                folder = hf_io.path_inside(path, module.get("path", ""), modules_file)
                pooling = _read_pooling(os.path.join(folder, "config.json"))
        max_len = _max_seq_length(os.path.join(path, "sentence_bert_config.json"))
        # sentence-transformers 6 keeps it as the tokenizer's model_max_length (huge where unlimited)
        tokenizer_max = _json_field(os.path.join(path, "tokenizer_config.json"), "model_max_length")
        max_len = max_len or (tokenizer_max if _is_positive_int(tokenizer_max) else None)
    return pooling, (max_len if max_len and max_len < 1_000_000 else None)


def _read_pooling(file: str) -> str | None:
    """The pooling a sentence-transformers Pooling config names, None if not exactly one we support."""
    cfg = hf_io.read_json(file)
    on = [name for key, name in _ST_POOLING_FLAGS.items() if cfg.get(key)]
    mode = cfg.get("pooling_mode")
    return on[0] if len(on) == 1 else _ST_POOLING.get(mode) if isinstance(mode, str) else None


def _max_seq_length(file: str) -> int | None:
    value = _json_field(file, "max_seq_length")
    if value is not None and not _is_positive_int(value):
        raise DretError(f"{file}: max_seq_length: expected a positive integer, got {value!r:.80}")
    return value


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _json_field(path: str, key: str):
    return hf_io.read_json(path).get(key) if os.path.isfile(path) else None


def _forward(graphdef, state, ids_rl, slots_rl, positions_rl, lengths_rl, *, texts_per_row, pooling, normalize,
             dim):
    """Packed rows [R, L] (`dret.eval.encode.PackedBatch`) -> vectors [R, texts_per_row, dim]."""
    model = nnx.merge(graphdef, state)
    with activation_rules(encode_lib.batch_rules()):
        segments_rl = jnp.where(lengths_rl.max(1, keepdims=True) > 0, slots_rl + 1, 0)  # 0: an empty row
        h_rld = model(ids_rl, segments_rl, positions_bt=positions_rl)
    w_rl = pool_weights(positions_rl, lengths_rl, pooling)
    per_row = jax.vmap(lambda h_ld, s_l: jax.ops.segment_sum(h_ld, s_l, num_segments=texts_per_row + 1))
    v_rkd = per_row(h_rld.astype(jnp.float32) * w_rl[..., None], slots_rl)[:, :texts_per_row]
    return finish(v_rkd, normalize=normalize, dim=dim)


def jit_forward(graphdef, compiler_options: dict | None):
    """`(state, ids_rl, slots_rl, positions_rl, lengths_rl, *, texts_per_row, pooling, normalize, dim)
    -> [R, texts_per_row, dim]`, jitted. The graphdef is a static argument (hashed by value), so every Embedder of
    one architecture shares the compiled forward: reloading a model or a checkpoint does not compile again."""
    jitted = jax.jit(_forward, static_argnums=0, static_argnames=("texts_per_row", "pooling", "normalize", "dim"),
                     compiler_options=compiler_options)
    return functools.partial(jitted, graphdef)


class Embedder:
    """A text -> vector model: `Embedder.from_pretrained(dir).encode(texts)`."""

    def __init__(self, backbone, tokenizer, hf_config: dict, *, pooling: str, normalize: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH):
        if pooling not in POOLING_METHODS:
            raise DretError(f"pooling {pooling!r} is not supported; expected one of {', '.join(POOLING_METHODS)}")
        self.backbone, self.tokenizer, self.hf_config = backbone, tokenizer, hf_config
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        self.dim = backbone.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str, *, pooling: str | None = None, normalize: bool = True, dtype=None,
                        allow_pickle: bool = False) -> "Embedder":
        """Load an HF / sentence-transformers folder; pooling defaults to its sentence-transformers config."""
        backbone, hf = hf_io.load_model(path, dtype=jnp.dtype(dtype or jnp.float32), allow_pickle=allow_pickle)
        st_pooling, st_max_len = _read_sentence_transformers(path)
        pooling = pooling or st_pooling
        if pooling is None:
            raise DretError(f"{path} has no sentence-transformers pooling config: pass pooling= "
                            f"(one of {', '.join(POOLING_METHODS)})")
        tokenizer = hf_io.load_tokenizer(path, backbone.config.vocab_size)
        max_length = min(st_max_len or DEFAULT_MAX_LENGTH, backbone.config.max_position_embeddings
                         - backbone.config.position_offset)
        return cls(backbone, tokenizer, hf, pooling=pooling, normalize=normalize, max_length=max_length)

    def save(self, out_dir: str) -> None:
        """HF + sentence-transformers folder (see `hf_io.export`)."""
        hf_io.export(self.backbone, self.hf_config, self.tokenizer, out_dir, pooling=self.pooling,
                     normalize=self.normalize, max_seq_length=self.max_length)

    @functools.cached_property
    def _jitted(self):
        return jit_forward(nnx.split(self.backbone)[0], inference_compiler_options(self.backbone.dtype))

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with special tokens, truncated right to max_length."""
        return self.tokenizer(list(texts), truncation=True, max_length=max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def encode(self, texts: list[str], *, batch_size: int = 64, max_length: int | None = None,
               instruction: str = "", dim: int | None = None, progress: bool = True) -> np.ndarray:
        """Texts -> float32 [N, dim or d]. max_length defaults to the model's (sentence-transformers config, else 512).

        Texts are packed into shared rows (`dret.eval.encode`): no padding, and a vector does not depend on the
        other texts. A batch holds about batch_size x max_length tokens.
        """
        if dim is not None and not 0 < dim <= self.dim:
            raise DretError(f"dim={dim}: expected 1..{self.dim} (the model's embedding size)")
        max_length = max_length or self.max_length
        ids = self.tokenize([instruction + t for t in texts], max_length)
        state = encode_lib.replicate(nnx.split(self.backbone)[1])
        forward = functools.partial(self._jitted, state, pooling=self.pooling, normalize=self.normalize, dim=dim)
        row_tokens = CPU_BLOCK_TOKENS if jax.default_backend() == "cpu" else max_length
        return encode_lib.encode_ids(forward, ids, out_dim=dim or self.dim, tokens_per_batch=batch_size * max_length,
                                     row_tokens=row_tokens, pad_id=self.tokenizer.pad_token_id or 0,
                                     progress=progress)
