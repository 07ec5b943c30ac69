"""NV-Embed's latent-attention block: each token's hidden state attends to a set of trained latents (its keys and
values), then a GEGLU feed-forward; both residual. [B, T, D] -> [B, T, D], token by token (no token sees another),
so packed rows stay exact. The masked mean over the tokens is the pooling's (`dret.pooling`, method "latent").

As in the families: parameters name logical axes only, matmuls give float32 results, LayerNorm and softmax run in
float32. The block is called as a layer (`layer(x_btd, segments_bt, positions_bt, dropout_rng)`, see
`dret.models.layers.run_layers`), so it is rematerialised in training and blocked on CPU like any layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dret.errors import DretError
from dret.models.blocks import dense, gelu, layer_norm

# our field -> NV-Embed's `latent_attention_config` key
HF_KEYS = {"num_latents": "num_latents_value", "num_heads": "num_cross_heads", "head_dim": "cross_dim_head",
           "latent_dim": "latent_dim", "hidden_dim": "hidden_dim"}


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """The block's sizes: `num_latents` latents of `latent_dim`, `num_heads` x `head_dim` cross-attention (queries
    from the hidden states, of `hidden_dim`), a feed-forward of ffn_mult x latent_dim (GEGLU: twice that in)."""

    num_latents: int
    num_heads: int
    head_dim: int
    latent_dim: int
    hidden_dim: int
    ffn_mult: int = 4
    layer_norm_eps: float = 1e-5  # torch's LayerNorm default, which NV-Embed keeps

    @classmethod
    def from_hf(cls, hf: dict, hidden_size: int, source: str) -> "LatentConfig":
        """The sizes of an NV-Embed `latent_attention_config` dict (`source` names it in errors) for a backbone of
        `hidden_size`: positive integers, latent_dim and hidden_dim equal to hidden_size (the block is residual)."""
        missing = [key for key in HF_KEYS.values() if hf.get(key) is None]
        if missing:
            raise DretError(f"{source}: missing {', '.join(missing)}")
        values = {field: hf[key] for field, key in HF_KEYS.items()}
        for field, value in values.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise DretError(f"{source}.{HF_KEYS[field]}: expected a positive integer, got {value!r:.80}")
        for field in ("latent_dim", "hidden_dim"):
            if values[field] != hidden_size:
                raise DretError(f"{source}.{HF_KEYS[field]}: expected {hidden_size} (text_config.hidden_size: the "
                                f"block adds its output to the hidden states), got {values[field]}")
        return cls(**values)


class LatentAttention(nnx.Module):
    """x + to_out(attend(to_q(norm(x)), to_kv(norm_context(latents)))), then y + ff_out(geglu(ff_in(ff_norm(y)))).
    Attribute names are NV-Embed's leaf names (`dret.models.nvembed` maps them to its checkpoint's)."""

    def __init__(self, cfg: LatentConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, n, h, f = cfg.latent_dim, cfg.num_heads, cfg.head_dim, cfg.ffn_mult * cfg.latent_dim
        self.num_heads, self.head_dim, self.dtype = n, h, dtype
        self.latents = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0), (None, "embed"))(
            rngs.params(), (cfg.num_latents, d), param_dtype))
        self.norm = layer_norm(d, cfg.layer_norm_eps, param_dtype, rngs)
        self.norm_context = layer_norm(cfg.hidden_dim, cfg.layer_norm_eps, param_dtype, rngs)
        self.to_q = dense(d, n * h, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=False)
        self.to_kv = dense(cfg.hidden_dim, 2 * n * h, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=False)
        self.to_out = dense(n * h, d, ("heads", "embed"), dtype, param_dtype, rngs, use_bias=False)
        self.ff_norm = layer_norm(d, cfg.layer_norm_eps, param_dtype, rngs)
        self.ff_in = dense(d, 2 * f, ("embed", "mlp"), dtype, param_dtype, rngs, use_bias=True)
        self.ff_out = dense(f, d, ("mlp", "embed"), dtype, param_dtype, rngs, use_bias=True)

    def __call__(self, x_btd, segments_bt=None, positions_bt=None, dropout_rng=None):
        """x_btd [B, T, D] -> [B, T, D] float32. Segments, positions and dropout_rng are a layer's arguments, unused:
        each token attends to the latents only, and the block has no dropout."""
        b, t, _ = x_btd.shape
        x_btd = x_btd.astype(jnp.float32)
        q_btnh = self.to_q(self.norm(x_btd)).reshape(b, t, self.num_heads, self.head_dim)
        kv_l2nh = self.to_kv(self.norm_context(self.latents.get_value().astype(jnp.float32)))
        k_lnh, v_lnh = (kv.reshape(-1, self.num_heads, self.head_dim) for kv in jnp.split(kv_l2nh, 2, axis=-1))
        scores_bntl = jnp.einsum("btnh,lnh->bntl", q_btnh.astype(self.dtype), k_lnh.astype(self.dtype),
                                 preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        p_bntl = jax.nn.softmax(scores_bntl, axis=-1)
        attn_btnh = jnp.einsum("bntl,lnh->btnh", p_bntl.astype(self.dtype), v_lnh.astype(self.dtype),
                               preferred_element_type=jnp.float32)
        x_btd = x_btd + self.to_out(attn_btnh.reshape(b, t, self.num_heads * self.head_dim))
        u_btf, gate_btf = jnp.split(self.ff_in(self.ff_norm(x_btd)), 2, axis=-1)
        return x_btd + self.ff_out(u_btf * gelu(gate_btf))
