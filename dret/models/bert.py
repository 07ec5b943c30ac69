"""BERT-family encoders in Flax NNX: BERT, RoBERTa / XLM-R (offset position ids), ERNIE 3.0 (task types).

Parameters name logical axes only; `dret.sharding` maps them to a mesh. Compute dtype (`dtype`) and
parameter dtype (`param_dtype`) are separate. Matmuls take compute-dtype inputs and give float32 results, and
the residual stream, layer norms and softmax stay float32 (torch autocast keeps matmul outputs in bf16): closer
to fp32 embeddings, and faster on CPUs with bf16 units (figures: `bench/RESULTS_eval.md`, "Measurements behind
the code").

The family's surface for `dret.models` (the registry) and `dret.hf_io`: MODEL_TYPES and HF_CLASSES, `config_of`,
`build`, the HF key table (`hf_name`, `transposed`, `checkpoint_prefix`, UNUSED_KEYS, VOCAB_TABLE), PaddleNLP's names
(PADDLE_CLASSES, `from_paddle_config`, `from_paddle_name`, `from_paddle_tensor`), LORA_MODULES / LORA_TARGETS, TINY,
and on the config `hidden_size`, `vocab_size` and `max_text_length`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dret.errors import DretError
from dret.models import added_tokens
from dret.models.attention import dot_product_attention
from dret.models.blocks import dense, gelu, layer_norm
from dret.models.layers import ACTIVATION_AXES, run_layers
from dret.models.logical import constrain

# model_type -> the HF class an exported config.json names in `architectures` (and that a config.json without a
# model_type may name there)
HF_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel", "ernie": "ErnieModel"}
MODEL_TYPES = tuple(HF_CLASSES)
GGUF_ARCHITECTURES = {}  # none: BERT-family GGUF files are not read
LORA_MODULES = ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")  # the names lora_target_modules may use
LORA_TARGETS = ("query", "key", "value")  # adapters when lora_target_modules is () (the reference: q, k, v)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)  # config.tiny's shape


_ACTIVATIONS = {
    "gelu": gelu,
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
        "model_type": (value in MODEL_TYPES, f"one of {', '.join(MODEL_TYPES)} (supported model_type)"),
        "hidden_act": (isinstance(value, str) and value in _ACTIVATIONS, f"one of {', '.join(_ACTIVATIONS)}"),
        "pad_token_id": (is_int and value >= 0, "an integer >= 0"),
        "layer_norm_eps": (is_number and value > 0, "a positive number"),
        "hidden_dropout_prob": (is_number and 0 <= value < 1, "a number in [0, 1)"),
        "use_task_id": (isinstance(value, bool), "true or false"),
        "added_tokens": (is_int and value >= 0, "an integer >= 0"),
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
    added_tokens: int = 0  # not an HF field: embedding rows for tokens past vocab_size (special tokens a run added)

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

    @property
    def max_text_length(self) -> int:
        """The most tokens (special tokens included) one text may have."""
        return self.max_position_embeddings - self.position_offset


def config_of(hf: dict[str, Any], source: str = "config.json") -> BertConfig:
    """The validated config (see `BertConfig.from_hf`)."""
    return BertConfig.from_hf(hf, source)


def build(cfg: BertConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs) -> BertModel:
    """The backbone of `cfg`."""
    return BertModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)


# --- HF checkpoint names, for import and export ------------------------------------------------------------------
# Checkpoint parts that embeddings never use (task heads, the NSP pooler, buffers): skipped, and logged.
UNUSED_KEYS = re.compile(r"^(pooler\.|cls\.|lm_head\.|classifier\.|qa_outputs\.|embeddings\.position_ids$)")
# HF name (after the layer prefix) -> our module path
_EMBEDDING_KEYS = {
    "embeddings.word_embeddings": ("embeddings", "word"),
    "embeddings.position_embeddings": ("embeddings", "position"),
    "embeddings.token_type_embeddings": ("embeddings", "token_type"),
    "embeddings.task_type_embeddings": ("embeddings", "task_type"),
    "embeddings.LayerNorm": ("embeddings", "norm"),
}
_LAYER_KEYS = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in", "output.dense": "mlp_out", "output.LayerNorm": "mlp_norm",
}
_EMBEDDING_NAMES = {ours: hf for hf, ours in _EMBEDDING_KEYS.items()}
_LAYER_NAMES = {ours: hf for hf, ours in _LAYER_KEYS.items()}
_PARAM_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
VOCAB_TABLE = ("embeddings", "word", "embedding")  # the base token embeddings; added rows beside them


def hf_name(path: tuple) -> str:
    """Our flat state path, e.g. ('layers', 3, 'query', 'kernel') -> 'encoder.layer.3.attention.self.query.weight'."""
    *module, param = path
    if module[0] == "layers":
        prefix = f"encoder.layer.{module[1]}.{_LAYER_NAMES[module[2]]}"
    else:
        prefix = _EMBEDDING_NAMES[tuple(module)]
    return f"{prefix}.{_PARAM_NAMES[param]}"


def transposed(path: tuple) -> bool:
    """Whether the HF tensor is ours transposed: Linear weights are [out, in] in HF, [in, out] here."""
    return path[-1] == "kernel"


def checkpoint_prefix(names, cfg: BertConfig) -> str:
    """The prefix task-model checkpoints nest the encoder under (`bert.`, `roberta.`, ...; "" for none), from the
    checkpoint's tensor names."""
    for prefix in ("", f"{cfg.model_type.replace('-', '_')}.", "bert.", "roberta.", "ernie.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in names:
            return prefix
    return ""


# --- PaddleNLP checkpoints (matched to paddlenlp 3.0.0b4 `transformers/{ernie,bert,roberta}/modeling.py`) ---------
# PaddleNLP class-name stem -> HF model_type (`ErnieModel`, `ErnieForSequenceClassification`, ... are "ernie")
PADDLE_CLASSES = {"Ernie": "ernie", "Bert": "bert", "Roberta": "roberta"}
# PaddleNLP's config defaults where they differ from HF's (its three configs agree on these)
_PADDLE_DEFAULTS = {"type_vocab_size": 16, "pad_token_id": 0}
# paddle.nn.TransformerEncoderLayer's module names -> HF's (embeddings keep HF's names but `layer_norm`)
_PADDLE_LAYER_KEYS = {
    "self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm", "linear1": "intermediate.dense", "linear2": "output.dense",
    "norm2": "output.LayerNorm",
}
_PADDLE_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2", "dense")
_PADDLE_LAYER = re.compile(r"^(?P<prefix>.*)encoder\.layers\.(?P<i>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)$")


def from_paddle_config(paddle: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The HF config dict of a (flattened) PaddleNLP config, with PaddleNLP's defaults and the LayerNorm epsilon
    PaddleNLP computes with."""
    hf = {**_PADDLE_DEFAULTS, **{k: v for k, v in paddle.items() if v is not None}, "model_type": model_type}
    if hf.get("use_task_id") and hf.get("task_id", 0) != 0:  # PaddleNLP adds task type `task_id`, HF adds type 0
        raise DretError(f"{source}: task_id: expected 0 (the task type HF's ERNIE adds), got {hf['task_id']!r:.80}")
    if model_type == "ernie":  # ErniePretrainedModel._init_weights sets every LayerNorm's epsilon to 1e-12
        hf["layer_norm_eps"] = 1e-12
    return hf


def from_paddle_name(name: str) -> str:
    """A PaddleNLP checkpoint name -> HF's, e.g. 'ernie.encoder.layers.3.self_attn.q_proj.weight' ->
    'ernie.encoder.layer.3.attention.self.query.weight'; names without a counterpart are returned as they are."""
    m = _PADDLE_LAYER.match(name)
    if m and m["module"] in _PADDLE_LAYER_KEYS:
        return f"{m['prefix']}encoder.layer.{m['i']}.{_PADDLE_LAYER_KEYS[m['module']]}.{m['param']}"
    return name.replace("embeddings.layer_norm.", "embeddings.LayerNorm.")


def from_paddle_tensor(paddle_name: str, value):
    """A PaddleNLP tensor in HF's layout: paddle's Linear weights are [in, out], HF's [out, in]."""
    *_, module, param = paddle_name.split(".")
    return value.T if param == "weight" and module in _PADDLE_LINEARS and value.ndim == 2 else value


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
        self.added_embeddings = added_tokens.new_rows(self.word, cfg.added_tokens)
        self.position = _embed(cfg.max_position_embeddings, d, ("position", "embed"), dtype, param_dtype, rngs)
        self.token_type = _embed(cfg.type_vocab_size, d, ("token_type", "embed"), dtype, param_dtype, rngs)
        self.task_type = (_embed(cfg.task_type_vocab_size, d, ("token_type", "embed"), dtype, param_dtype, rngs)
                          if cfg.use_task_id else None)
        self.norm = layer_norm(d, cfg.layer_norm_eps, param_dtype, rngs)

    def __call__(self, ids_bt, position_ids_bt, token_type_ids_bt):
        x_btd = (added_tokens.lookup(self.word, self.added_embeddings, ids_bt) + self.position(position_ids_bt)
                 + self.token_type(token_type_ids_bt))
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
        self.query = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.key = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.value = dense(d, d, ("embed", "heads"), dtype, param_dtype, rngs)
        self.attn_out = dense(d, d, ("heads", "embed"), dtype, param_dtype, rngs)
        self.attn_norm = layer_norm(d, eps, param_dtype, rngs)
        self.mlp_in = dense(d, f, ("embed", "mlp"), dtype, param_dtype, rngs)
        self.mlp_out = dense(f, d, ("mlp", "embed"), dtype, param_dtype, rngs)
        self.mlp_norm = layer_norm(d, eps, param_dtype, rngs)

    def __call__(self, x_btd, segments_bt, positions_bt, dropout_rng):
        """Positions are already in the embeddings (BERT adds them once, before the first layer)."""
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
        if cfg.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {cfg.model_type!r} is not a BERT-family encoder ({', '.join(MODEL_TYPES)})")
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.embeddings = Embeddings(cfg, dtype, param_dtype, rngs)
        self.layers = nnx.List([Layer(cfg, dtype, param_dtype, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, ids_bt, segments_bt, *, positions_bt=None, dropout_rng: jax.Array | None = None):
        """`segments_bt` is 0 for padding and otherwise the token's segment: tokens attend within their segment, so
        a packed row holds several texts (a 0/1 mask is one text per row). `positions_bt` are the tokens' positions
        within their texts (None: as HF counts them in a padded row); `dropout_rng` None means deterministic
        (eval)."""
        cfg = self.config
        if positions_bt is not None:
            position_ids_bt = positions_bt + cfg.position_offset
        elif cfg.position_offset:
            position_ids_bt = jnp.cumsum(segments_bt != 0, axis=1) * (segments_bt != 0) + cfg.pad_token_id
        else:
            position_ids_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1]), ids_bt.shape)
        x_btd = self.embeddings(ids_bt, position_ids_bt, jnp.zeros_like(ids_bt))
        x_btd = constrain(x_btd, ACTIVATION_AXES)
        if dropout_rng is not None:
            x_btd = _dropout(x_btd, cfg.hidden_dropout_prob, jax.random.fold_in(dropout_rng, len(self.layers)))
        return run_layers(self.layers, x_btd, segments_bt.astype(jnp.int32), position_ids_bt, dropout_rng,
                          remat=self.remat)
