"""Embedder = backbone + pooling + optional L2 normalisation, and its batched, packed `encode`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dret import encode as encode_lib
from dret import hf_io, models, prompts
from dret.errors import DretError
from dret.models import cpu
from dret.models.logical import activation_rules
from dret.pooling import POOLING_METHODS, finish, pool_weights
from dret.tokens import check_instruction

DEFAULT_MAX_LENGTH = 512


def _forward(graphdef, state, ids_rl, slots_rl, positions_rl, lengths_rl, *, texts_per_row, pooling, normalize,
             dim, pool_from=0):
    """Packed rows [R, L] (`dret.encode.PackedBatch`) -> vectors [R, texts_per_row, dim]; each text's first
    `pool_from` tokens (a traced int: NV-Embed's instruction) are left out of its pooling."""
    model = nnx.merge(graphdef, state)
    with activation_rules(encode_lib.batch_rules()):
        segments_rl = jnp.where(lengths_rl.max(1, keepdims=True) > 0, slots_rl + 1, 0)  # 0: an empty row
        h_rld = model(ids_rl, segments_rl, positions_bt=positions_rl)
    w_rl = pool_weights(positions_rl, lengths_rl, pooling, starts_bt=pool_from)
    per_row = jax.vmap(lambda h_ld, s_l: jax.ops.segment_sum(h_ld, s_l, num_segments=texts_per_row + 1))
    v_rkd = per_row(h_rld.astype(jnp.float32) * w_rl[..., None], slots_rl)[:, :texts_per_row]
    return finish(v_rkd, normalize=normalize, dim=dim)


def jit_forward(graphdef, compiler_options: dict | None):
    """`(state, ids_rl, slots_rl, positions_rl, lengths_rl, *, texts_per_row, pooling, normalize, dim, pool_from)
    -> [R, texts_per_row, dim]`, jitted. The graphdef is a static argument (hashed by value), so every Embedder of
    one architecture shares the compiled forward: reloading a model or a checkpoint does not compile again."""
    jitted = jax.jit(_forward, static_argnums=0, static_argnames=("texts_per_row", "pooling", "normalize", "dim"),
                     compiler_options=compiler_options)
    return functools.partial(jitted, graphdef)


class Embedder:
    """A text -> vector model: `Embedder.from_pretrained(dir).encode(texts)`."""

    def __init__(self, backbone, tokenizer, hf_config: dict, *, pooling: str, normalize: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH, prompts: dict[str, str] | None = None, prompt_format: str = ""):
        if pooling not in POOLING_METHODS:
            raise DretError(f"pooling {pooling!r} is not supported; expected one of {', '.join(POOLING_METHODS)}")
        self.backbone, self.tokenizer, self.hf_config = backbone, tokenizer, hf_config
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        self.prompts = dict(prompts or {})  # role ("query", "document") -> its instruction, as sentence-transformers
        self.prompt_format = prompt_format  # how a text becomes token ids (`dret.prompts`; "" = instruction + text)
        self.mask_instruction = models.masks_instruction(hf_config)  # NV-Embed: instruction tokens are not pooled
        self.dim = backbone.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: str, *, pooling: str | None = None, normalize: bool = True, dtype=None,
                        allow_pickle: bool = False) -> "Embedder":
        """Load an HF / sentence-transformers folder or a GGUF file; pooling defaults to the folder's
        sentence-transformers config (NV-Embed's: latent)."""
        backbone, hf = hf_io.load_model(path, dtype=jnp.dtype(dtype or jnp.float32), allow_pickle=allow_pickle)
        st_pooling, st_max_len = hf_io.read_sentence_transformers(path)
        pooling = pooling or ("latent" if models.family_of(hf) is models.nvembed else st_pooling)
        if pooling is None:
            raise DretError(f"{path} has no sentence-transformers pooling config: pass pooling= "
                            f"(one of {', '.join(POOLING_METHODS)})")
        tokenizer = hf_io.load_tokenizer(path, backbone.config.vocab_size)
        max_length = min(st_max_len or DEFAULT_MAX_LENGTH, backbone.config.max_text_length)
        return cls(backbone, tokenizer, hf, pooling=pooling, normalize=normalize, max_length=max_length,
                   prompts=hf_io.read_prompts(path),
                   prompt_format=hf_io.read_dret_settings(path).get("prompt_format", ""))

    def save(self, out_dir: str) -> None:
        """HF + sentence-transformers folder (see `hf_io.save_folder`)."""
        hf_io.save_folder(self.backbone, self.hf_config, self.tokenizer, out_dir, pooling=self.pooling,
                          normalize=self.normalize, max_seq_length=self.max_length, prompts=self.prompts,
                          prompt_format=self.prompt_format)

    @functools.cached_property
    def forward(self):
        """The jitted packed forward (`jit_forward`) with this backbone's compile options."""
        return jit_forward(nnx.split(self.backbone)[0], cpu.compiler_options(self.backbone.dtype))

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with special tokens, truncated right to max_length (the plain format, no instruction)."""
        return prompts.encode("plain", self.tokenizer, texts, role="passage", max_length=max_length)

    def encode(self, texts: list[str], *, batch_size: int = 64, max_length: int | None = None,
               instruction: str = "", dim: int | None = None, progress: bool = True, role: str = "passage",
               examples: tuple[str, ...] = ()) -> np.ndarray:
        """Texts -> float32 [N, dim or d]. max_length defaults to the model's (sentence-transformers config, else 512).
        The texts are `role` ("query" / "passage") in the model's prompt format (`dret.prompts`; bge_icl queries
        take `examples`, each `prompts.format_example`).

        Texts are packed into shared rows (`dret.encode`): no padding, and a vector does not depend on the
        other texts. A batch holds about batch_size x max_length tokens.
        """
        if dim is not None and not 0 < dim <= self.dim:
            raise DretError(f"dim={dim}: expected 1..{self.dim} (the model's embedding size)")
        max_length = max_length or self.max_length
        check_instruction(self.tokenizer, instruction, max_length, "instruction")
        ids = prompts.encode(self.prompt_format, self.tokenizer, texts, role=role, max_length=max_length,
                             instruction=instruction, examples=[list(examples)] * len(texts) if examples else None)
        pool_from = prompts.instruction_length(self.tokenizer, instruction) if self.mask_instruction else 0
        state = encode_lib.replicate(nnx.split(self.backbone)[1])
        forward = functools.partial(self.forward, state, pooling=self.pooling, normalize=self.normalize, dim=dim,
                                    pool_from=jnp.int32(pool_from))
        return encode_lib.encode_ids(forward, ids, out_dim=dim or self.dim, tokens_per_batch=batch_size * max_length,
                                     row_tokens=cpu.encode_row_tokens(max_length),
                                     pad_id=self.tokenizer.pad_token_id or 0, progress=progress)
