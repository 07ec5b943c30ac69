"""BERT-family encoders in Flax NNX: BERT, RoBERTa / XLM-R (offset position ids), ERNIE 3.0 (task types).

Parameters name logical axes only; `dret.sharding` maps them to a mesh. Compute dtype (`dtype`) and
parameter dtype (`param_dtype`) are separate. Matmuls take compute-dtype inputs and give float32 results, and
the residual stream, layer norms and softmax stay float32 (as under torch autocast, which keeps matmul outputs
in bf16). In bf16 this halved MiniLM's embedding error from fp32 (SciFact NDCG@10 0.0011 from fp32, against
0.0024 with bf16 results), and XLA:CPU's bf16 dots with float32 results encoded SciFact 1.6x faster than fp32 on
the 2-core AVX512-BF16 machine (`bench/RESULTS_eval.md`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dret.errors import DretError
from dret.models.attention import dot_product_attention
from dret.models.blocks import examples_per_step, map_examples
from dret.models.logical import constrain

ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "ernie")
ACTIVATION_AXES = ("batch", "length", "embed")  # hidden states between layers
CPU_BLOCK_TOKENS = 1024  # tokens per block (per batch shard) when a layer runs block by block (CPU inference)


def _gelu(x):
    """Exact GELU in torch's form, x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's erfc form took 1.84 ms against 0.76 on a
    [1024, 1536] MiniLM block on CPU (about 4% of an encode forward), and differs more from torch for very
    negative x."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "task_type_vocab_size")


def _config_value_problem(name: str, value) -> str | None:
    """What a config field must be, where `value` is not that (None where it is)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_int or (isinstance(value, float) and math.isfinite(value))
    if name in _POSITIVE_INTS and not (is_int and value > 0):
        return "a positive integer"
    checks = {
        "model_type": (value in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)} (supported model_type)"),
        "hidden_act": (isinstance(value, str) and value in _ACTIVATIONS, f"one of {', '.join(_ACTIVATIONS)}"),
        "pad_token_id": (is_int and value >= 0, "an integer >= 0"),
        "layer_norm_eps": (is_number and value > 0, "a positive number"),
        "hidden_dropout_prob": (is_number and 0 <= value < 1, "a number in [0, 1)"),
        "use_task_id": (isinstance(value, bool), "true or false"),
    }
    ok, expected = checks.get(name, (True, None))
    return None if ok else expected


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of an HF `config.json` that the encoder uses."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    use_task_id: bool = False  # ERNIE 3.0
    task_type_vocab_size: int = 3

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "BertConfig":
        """The encoder's fields of an HF config dict (null values take the defaults); a DretError naming `source`
        for a missing or unusable value."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and v is not None}
        for name in (n for n in fields if n in values):  # model_type first
            expected = _config_value_problem(name, values[name])
            if expected:
                raise DretError(f"{source}: {name}: expected {expected}, got {values[name]!r:.80}")
        missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in values]
        if missing:
            raise DretError(f"{source}: missing {', '.join(missing)}")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise DretError(f"{source}: num_attention_heads {values['num_attention_heads']} does not divide "
                            f"hidden_size {values['hidden_size']}")
        return cls(**values)

    @property
    def position_offset(self) -> int:
        """RoBERTa and XLM-R count positions from pad_token_id + 1."""
        return self.pad_token_id + 1 if self.model_type in ("roberta", "xlm-roberta") else 0


def _dense(n_in, n_out, axes, dtype, param_dtype, rngs):
    return nnx.Linear(
        n_in, n_out, dtype=dtype, param_dtype=param_dtype, preferred_element_type=jnp.float32, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]),
    )


def _norm(n, eps, param_dtype, rngs):
    return nnx.LayerNorm(
        n, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
    )


def _embed(n, d, axes, dtype, param_dtype, rngs):
    return nnx.Embed(
        n, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
    )


def _dropout(x, rate: float, rng: jax.Array | None):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word = _embed(cfg.vocab_size, d, ("vocab", "embed"), dtype, param_dtype, rngs)
        self.position = _embed(cfg.max_position_embeddings, d, ("position", "embed"), dtype, param_dtype, rngs)
        self.token_type = _embed(cfg.type_vocab_size, d, ("token_type", "embed"), dtype, param_dtype, rngs)
        self.task_type = (_embed(cfg.task_type_vocab_size, d, ("token_type", "embed"), dtype, param_dtype, rngs)
                          if cfg.use_task_id else None)
        self.norm = _norm(d, cfg.layer_norm_eps, param_dtype, rngs)

    def __call__(self, ids_bt, position_ids_bt, token_type_ids_bt):
        x_btd = self.word(ids_bt) + self.position(position_ids_bt) + self.token_type(token_type_ids_bt)
        if self.task_type is not None:  # HF ERNIE defaults task_type_ids to zeros
            x_btd = x_btd + self.task_type(jnp.zeros_like(ids_bt))
        return self.norm(x_btd)


class Layer(nnx.Module):
    """Post-norm transformer layer; attribute names mirror HF's so `hf_io` maps keys by table."""

    def __init__(self, cfg: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
        d, f, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
        self.num_heads = cfg.num_attention_heads
        self.dtype = dtype
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.dropout_rate = cfg.hidden_dropout_prob
        self.query = _dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.key = _dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.value = _dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.attn_out = _dense(d, d, ("heads", "embed"), dtype, param_dtype, rngs)
        self.attn_norm = _norm(d, eps, param_dtype, rngs)
        self.mlp_in = _dense(d, f, ("embed", "mlp"), dtype, param_dtype, rngs)
        self.mlp_out = _dense(f, d, ("mlp", "embed"), dtype, param_dtype, rngs)
        self.mlp_norm = _norm(d, eps, param_dtype, rngs)

    def __call__(self, x_btd, segments_bt, dropout_rng):
        b, t, d = x_btd.shape
        split = lambda y: y.astype(self.dtype).reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        attn_btnh = dot_product_attention(
            split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd)), segments_bt, segments_bt)
        rng_a, rng_m = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
        h = self.attn_out(attn_btnh.reshape(b, t, d))
        x_btd = self.attn_norm(x_btd + _dropout(h, self.dropout_rate, rng_a))
        h = self.mlp_out(self.act(self.mlp_in(x_btd)))
        return self.mlp_norm(x_btd + _dropout(h, self.dropout_rate, rng_m))


class BertModel(nnx.Module):
    """Token ids [B, T] -> last hidden states [B, T, D] in float32."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        if cfg.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {cfg.model_type!r} is not a BERT-family encoder ({', '.join(ARCHITECTURES)})")
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.embeddings = Embeddings(cfg, dtype, param_dtype, rngs)
        self.layers = nnx.List([Layer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, ids_bt, mask_bt, *, positions_bt=None, dropout_rng: jax.Array | None = None):
        """`mask_bt` is 0 for padding and otherwise the token's segment: tokens attend within their segment, so
        a packed row holds several texts (1 for every real token: one text per row). `positions_bt` are the
        tokens' positions within their texts (None: as HF counts them in a padded row); `dropout_rng` None
        means deterministic (eval)."""
        cfg = self.config
        if positions_bt is not None:
            position_ids_bt = positions_bt + cfg.position_offset
        elif cfg.position_offset:
            position_ids_bt = jnp.cumsum(mask_bt != 0, axis=1) * (mask_bt != 0) + cfg.pad_token_id
        else:
            position_ids_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1]), ids_bt.shape)
        x_btd = self.embeddings(ids_bt, position_ids_bt, jnp.zeros_like(ids_bt))
        x_btd = constrain(x_btd, ACTIVATION_AXES)
        if dropout_rng is not None:
            x_btd = _dropout(x_btd, cfg.hidden_dropout_prob, jax.random.fold_in(dropout_rng, len(self.layers)))
        segments_bt = mask_bt.astype(jnp.int32)
        for i, layer in enumerate(self.layers):
            if dropout_rng is None:
                x_btd = _inference_layer(layer, x_btd, segments_bt)
            else:
                rng = jax.random.fold_in(dropout_rng, i)
                x_btd = (_rematerialised(layer, x_btd, segments_bt, rng) if self.remat
                         else layer(x_btd, segments_bt, rng))
            x_btd = constrain(x_btd, ACTIVATION_AXES)
        return x_btd


def _inference_layer(layer: Layer, x_btd, segments_bt):
    """On CPU the layer runs over blocks of about CPU_BLOCK_TOKENS tokens, so a block's [4T, 4D]-sized
    intermediates stay in cache (about 20% faster encoding than whole batches; 1024-token blocks ran MiniLM 3-10%
    faster than 4-example blocks at 64 and 128 tokens, and 2-example blocks were slower at 256). A block with no
    token (segments all 0: the empty rows that fill a packed batch) passes through unchanged. Training keeps
    whole-batch layers: its dropout masks are drawn batch-wide."""
    b, t = segments_bt.shape
    examples = max(1, CPU_BLOCK_TOKENS // t)
    if jax.default_backend() != "cpu" or examples_per_step(b, examples) == b:
        return layer(x_btd, segments_bt, None)  # one block: the layer itself (qwix adds LoRA adapters on such a call)
    graphdef, state = nnx.split(layer)

    def block(x, m):
        return jax.lax.cond(m.any(), lambda: nnx.merge(graphdef, state)(x, m, None), lambda: x)
    return map_examples(block, (x_btd, segments_bt), examples)


def _rematerialised(layer: Layer, x_btd, segments_bt, rng):
    """The layer under jax.checkpoint as a pure function of its state (so LoRA adapters work inside it)."""
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(lambda s, x, m, r: nnx.merge(graphdef, s)(x, m, r))(state, x_btd, segments_bt, rng)
