"""Decoder-only LLMs in Flax NNX: Llama 2 / 3 / 3.1 (RoPE scaling `linear`, `llama3`), Mistral (sliding window),
Qwen2 (q/k/v bias, sliding window on chosen layers); grouped-query attention, RMSNorm, SwiGLU. Causal attention,
or bidirectional (NV-Embed, LLM2Vec) when the config says `"bidirectional": true`. `"added_tokens": n` gives n
trainable embedding rows for special tokens beyond vocab_size (`dret.models.added_tokens`).

As in `bert`: parameters name logical axes only, compute and parameter dtypes are separate, matmuls give float32
results and the residual stream, norms, RoPE and softmax stay float32. The family's surface for `dret.models` and
`dret.hf_io` is bert's: MODEL_TYPES, HF_CLASSES, `config_of`, `build`, `hf_name`, `transposed`,
`checkpoint_prefix`, UNUSED_KEYS, VOCAB_TABLE, LORA_MODULES / LORA_TARGETS, TINY; attribute names mirror HF's, so the
key table is the module path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dret.errors import DretError
from dret.models import added_tokens
from dret.models.attention import dot_product_attention
from dret.models.blocks import dense
from dret.models.layers import ACTIVATION_AXES, run_layers
from dret.models.logical import constrain

# model_type -> the HF class an exported config.json names in `architectures`
HF_CLASSES = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model"}
MODEL_TYPES = tuple(HF_CLASSES)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = LORA_MODULES  # adapters when lora_target_modules is () (RepLLaMA: all seven)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)  # config.tiny's shape
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding frequencies: base `theta`, and the scaling of `rope_type` (linear: positions / factor;
    llama3: low frequencies / factor, high ones kept, smoothed between)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """[head_dim / 2] float32 angular frequencies, as transformers computes them."""
        inv_freq = 1.0 / self.theta ** (np.arange(0, head_dim, 2) / head_dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.rope_type == "llama3":
            wavelen = 2 * math.pi / inv_freq
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = ((self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            inv_freq = np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), smoothed, scaled)
        return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of an HF `config.json` that the decoder uses (biases and windows as the model type applies them)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: Rope
    qkv_bias: bool  # Llama: attention_bias (also on o_proj); Qwen2: always; Mistral: never
    o_bias: bool
    mlp_bias: bool
    layer_windows: tuple[int | None, ...]  # per layer: the sliding window (None: full causal attention)
    bidirectional: bool  # not an HF field: NV-Embed / LLM2Vec-style models attend both ways (no window)
    added_tokens: int  # not an HF field: embedding rows for tokens past vocab_size (special tokens a run added)
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None

    @property
    def max_text_length(self) -> int:
        """The most tokens (special tokens included) one text may have."""
        return self.max_position_embeddings


# --- config.json -> LlamaConfig -------------------------------------------------------------------------------------
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                  "original_max_position_embeddings")
_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings")
# HF's defaults where config.json leaves a field out (or null); Mistral's sliding window is on unless set to null
_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False,
             "mlp_bias": False, "use_sliding_window": False, "max_window_layers": 28, "bidirectional": False,
             "added_tokens": 0}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_token_id(value) -> bool:
    return value is None or (_is_int(value) and value >= 0)


def _problem(name: str, value) -> str | None:
    """What a config field must be, where `value` is not that (None where it is)."""
    if name in _POSITIVE_INTS:
        return None if _is_int(value) and value > 0 else "a positive integer"
    checks = {
        "model_type": (value in MODEL_TYPES, f"one of {', '.join(MODEL_TYPES)} (supported model_type)"),
        "hidden_act": (value == "silu", "silu"),
        "rms_norm_eps": (_is_number(value) and value > 0, "a positive number"),
        "rope_theta": (_is_number(value) and value > 0, "a positive number"),
        "factor": (_is_number(value) and value > 0, "a positive number"),
        "low_freq_factor": (_is_number(value) and value > 0, "a positive number"),
        "high_freq_factor": (_is_number(value) and value > 0, "a positive number"),
        "partial_rotary_factor": (value == 1, "1 (partial rotary embeddings are not supported)"),
        "max_window_layers": (_is_int(value) and value >= 0, "an integer >= 0"),
        "added_tokens": (_is_int(value) and value >= 0, "an integer >= 0"),
        "layer_types": (isinstance(value, list) and all(v in LAYER_TYPES for v in value),
                        f"a list of {' / '.join(LAYER_TYPES)}"),
        "pad_token_id": (_is_token_id(value), "an integer >= 0"),
        "bos_token_id": (_is_token_id(value), "an integer >= 0"),
        "eos_token_id": (_is_token_id(value) or (isinstance(value, list) and all(map(_is_token_id, value))),
                         "an integer >= 0 or a list of them"),
    }
    if name in ("attention_bias", "mlp_bias", "use_sliding_window", "bidirectional"):
        checks[name] = (isinstance(value, bool), "true or false")
    ok, expected = checks.get(name, (True, None))
    return None if ok else expected


def _checked(values: dict, source: str, prefix: str = "") -> dict:
    for name, value in values.items():
        expected = _problem(name, value)
        if expected:
            raise DretError(f"{source}: {prefix}{name}: expected {expected}, got {value!r:.80}")
    return values


def _rope_of(hf: dict, values: dict, source: str) -> Rope:
    """RoPE from transformers 5's `rope_parameters` or older configs' `rope_scaling` (+ `rope_theta`); `values`
    are the checked top-level fields."""
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise DretError(f"{source}: {key}: expected one object of RoPE parameters for every layer, "
                        f"got {params!r:.80}")
    params = {k: v for k, v in params.items() if v is not None}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise DretError(f"{source}: {key}: rope_type: expected one of {', '.join(ROPE_TYPES)} (supported RoPE "
                        f"scaling), got {rope_type!r:.80}")
    theta = params.get("rope_theta", values["rope_theta"])
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [n for n in needed if n not in params]
    if missing:
        raise DretError(f"{source}: {key}: missing {', '.join(missing)} (needed by rope_type {rope_type})")
    fields = {n: params[n] for n in needed}
    if rope_type == "llama3":
        fields["original_max_position_embeddings"] = params.get("original_max_position_embeddings",
                                                                values["max_position_embeddings"])
    _checked({"rope_theta": theta, **fields,
              **{n: params[n] for n in ("partial_rotary_factor",) if n in params}}, source, f"{key}.")
    if rope_type == "llama3" and fields["high_freq_factor"] <= fields["low_freq_factor"]:
        raise DretError(f"{source}: {key}: expected high_freq_factor > low_freq_factor, got "
                        f"{fields['high_freq_factor']} <= {fields['low_freq_factor']}")
    return Rope(theta=float(theta), rope_type=rope_type, **fields)


def _layer_windows(hf: dict, values: dict, source: str) -> tuple[int | None, ...]:
    """Each layer's sliding window, as transformers applies them: Mistral's on every layer, Qwen2's (with
    `use_sliding_window`) on the `layer_types` marked so (by default layers >= max_window_layers), Llama none.
    `sliding_window` absent is HF's default, 4096; null turns the window off."""
    n, model_type = values["num_hidden_layers"], values["model_type"]
    window = hf["sliding_window"] if "sliding_window" in hf else 4096
    if model_type == "llama" or (model_type == "qwen2" and not values["use_sliding_window"]):
        window = None
    if model_type == "mistral" or window is None:
        return (window,) * n
    layer_types = values.get("layer_types") or [
        "sliding_attention" if i >= values["max_window_layers"] else "full_attention" for i in range(n)]
    if len(layer_types) != n:
        raise DretError(f"{source}: layer_types: expected {n} entries (num_hidden_layers), got {len(layer_types)}")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def config_of(hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """The decoder's fields of an HF config dict (null values take HF's defaults); a DretError naming `source` for
    a missing or unusable value."""
    given = {k: v for k, v in hf.items() if v is not None}
    if "model_type" in given:
        _checked({"model_type": given["model_type"]}, source)
    missing = [name for name in _REQUIRED if name not in given]
    if missing:
        raise DretError(f"{source}: missing {', '.join(missing)}")
    values = _checked({**_DEFAULTS, **given}, source)
    heads = values["num_attention_heads"]
    kv_heads = values.setdefault("num_key_value_heads", heads)
    if heads % kv_heads:
        raise DretError(f"{source}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    if "head_dim" not in values and values["hidden_size"] % heads:
        raise DretError(f"{source}: num_attention_heads {heads} does not divide hidden_size {values['hidden_size']}")
    head_dim = values.get("head_dim", values["hidden_size"] // heads)
    if head_dim % 2:
        raise DretError(f"{source}: head_dim {head_dim}: expected an even number (RoPE rotates pairs)")
    model_type = values["model_type"]
    eos = values.get("eos_token_id")
    return LlamaConfig(
        model_type=model_type, vocab_size=values["vocab_size"], hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"], num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=values["max_position_embeddings"], rms_norm_eps=float(values["rms_norm_eps"]),
        rope=_rope_of(hf, values, source),
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and values["attention_bias"]),
        o_bias=model_type == "llama" and values["attention_bias"],
        mlp_bias=model_type == "llama" and values["mlp_bias"],
        layer_windows=_layer_windows(hf, values, source), bidirectional=values["bidirectional"],
        added_tokens=values["added_tokens"],
        pad_token_id=values.get("pad_token_id"), bos_token_id=values.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def build(cfg: LlamaConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs) -> LlamaModel:
    """The backbone of `cfg`."""
    return LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)


# --- HF checkpoint names, for import and export ------------------------------------------------------------------
# Checkpoint parts that embeddings never use (the LM or classification head, rotary buffers): skipped, and logged.
UNUSED_KEYS = re.compile(r"^(lm_head\.|score\.|(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$)")
_PARAM_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
VOCAB_TABLE = ("embed_tokens", "embedding")  # the base token embeddings; added rows beside them


def hf_name(path: tuple) -> str:
    """Our flat state path, e.g. ('layers', 3, 'self_attn', 'q_proj', 'kernel') -> 'layers.3.self_attn.q_proj.weight'
    (module names are HF's)."""
    *module, param = path
    return ".".join(map(str, (*module, _PARAM_NAMES[param])))


def transposed(path: tuple) -> bool:
    """Whether the HF tensor is ours transposed: Linear weights are [out, in] in HF, [in, out] here."""
    return path[-1] == "kernel"


def checkpoint_prefix(names, cfg: LlamaConfig) -> str:
    """`model.` for checkpoints of causal-LM (or classification) models, which nest the decoder; "" for none."""
    return "model." if "model.embed_tokens.weight" in names else ""


# --- GGUF (llama.cpp) tensor names and layout, for `dret.gguf_io` ---------------------------------------------------
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # general.architecture -> model_type (Mistral is "llama")
PADDLE_CLASSES = {}  # none: PaddleNLP Llama checkpoints are not read
_GGUF_MODULES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
                 "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
_GGUF_TOP_LEVEL = ("token_embd", "output_norm", "output")
_GGUF_NAME = re.compile(r"^(blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def from_gguf_name(name: str, source: str) -> str:
    """A GGUF tensor name -> its HF checkpoint name ('blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight';
    'output.weight' -> 'lm_head.weight', unused); a name outside the table is kept (the key check reports it)."""
    if name == "rope_freqs.weight":
        raise DretError(f"{source}: tensor rope_freqs.weight (llama.cpp's per-frequency RoPE factors, as in "
                        "Llama 3.1 files) is not supported: expected RoPE described by rope.* metadata")
    match = _GGUF_NAME.match(name)
    if not match or match[3] not in _GGUF_MODULES or (match[1] is None) != (match[3] in _GGUF_TOP_LEVEL):
        return name
    layer = f"layers.{match[2]}." if match[1] else ""
    return f"{layer}{_GGUF_MODULES[match[3]]}.{match[4]}"


def from_gguf_tensor(name: str, x: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Undo llama.cpp's converter, which for `llama` files interleaves each head's rotate-half pairs in the q_proj
    and k_proj rows (weights and biases) for its RoPE kernel: back to HF's order."""
    if cfg.model_type != "llama" or not re.search(r"self_attn\.[qk]_proj\.", name):
        return x
    heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# --- the model -----------------------------------------------------------------------------------------------------
def _rms_norm(n, eps, param_dtype, rngs):
    return nnx.RMSNorm(n, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)))


def rope_angles(positions_bt, inv_freq_k):
    """(cos, sin) [B, T, 1, K] float32 of each token's rotation angles, position * inv_freq."""
    angles_bt1k = (positions_bt.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq_k))[:, :, None, :]
    return jnp.cos(angles_bt1k), jnp.sin(angles_bt1k)


def rotated(x_btnh, cos_bt1k, sin_bt1k):
    """RoPE in float32: each head's pairs (i, i + H/2) rotated by angle i (HF's rotate_half layout)."""
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos_bt1k - x2 * sin_bt1k, x2 * cos_bt1k + x1 * sin_bt1k], axis=-1)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: causal (within a sliding window where `window` is set) or
    bidirectional, within each token's segment."""

    def __init__(self, cfg: LlamaConfig, window: int | None, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, kv, h
        self.rope, self.dtype = cfg.rope, dtype
        self.is_causal = not cfg.bidirectional
        self.window = None if cfg.bidirectional else window
        self.q_proj = dense(d, n * h, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=cfg.qkv_bias)
        self.k_proj = dense(d, kv * h, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=cfg.qkv_bias)
        self.v_proj = dense(d, kv * h, ("embed", "heads"), dtype, param_dtype, rngs, use_bias=cfg.qkv_bias)
        self.o_proj = dense(n * h, d, ("heads", "embed"), dtype, param_dtype, rngs, use_bias=cfg.o_bias)

    def __call__(self, x_btd, segments_bt, positions_bt):
        b, t, _ = x_btd.shape
        angles = rope_angles(positions_bt, self.rope.inv_freq(self.head_dim))
        q_btnh = rotated(self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim), *angles)
        k_btkh = rotated(self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim), *angles)
        v_btkh = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        attn_btnh = dot_product_attention(
            q_btnh.astype(self.dtype), k_btkh.astype(self.dtype), v_btkh.astype(self.dtype), segments_bt, segments_bt,
            is_causal=self.is_causal, window=self.window)
        return self.o_proj(attn_btnh.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense(d, f, ("embed", "mlp"), dtype, param_dtype, rngs, use_bias=cfg.mlp_bias)
        self.up_proj = dense(d, f, ("embed", "mlp"), dtype, param_dtype, rngs, use_bias=cfg.mlp_bias)
        self.down_proj = dense(f, d, ("mlp", "embed"), dtype, param_dtype, rngs, use_bias=cfg.mlp_bias)

    def __call__(self, x_btd):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class DecoderLayer(nnx.Module):
    """Pre-norm layer: x + attn(norm(x)), then x + mlp(norm(x)). These models have no dropout."""

    def __init__(self, cfg: LlamaConfig, window: int | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)
        self.self_attn = Attention(cfg, window, dtype, param_dtype, rngs)
        self.post_attention_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x_btd, segments_bt, positions_bt, dropout_rng):
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), segments_bt, positions_bt)
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd))


class LlamaModel(nnx.Module):
    """Token ids [B, T] (below vocab_size + added_tokens) -> last hidden states [B, T, D] (after the final norm) in
    float32."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.remat = remat
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.added_embeddings = added_tokens.new_rows(self.embed_tokens, cfg.added_tokens)
        self.layers = nnx.List([DecoderLayer(cfg, window, dtype, param_dtype, rngs) for window in cfg.layer_windows])
        self.norm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)

    def __call__(self, ids_bt, segments_bt, *, positions_bt=None, dropout_rng: jax.Array | None = None):
        """`segments_bt` is 0 for padding and otherwise the token's segment: tokens attend within their segment (and,
        unless bidirectional, to earlier tokens only), so a packed row holds several texts. `positions_bt` are the
        tokens' positions within their texts (None: the count of real tokens before each, which is HF's under right
        padding). `dropout_rng` is accepted as every backbone's is: these models have no dropout."""
        real_bt = segments_bt != 0
        if positions_bt is None:
            positions_bt = jnp.cumsum(real_bt, axis=1) - 1
        x_btd = constrain(added_tokens.lookup(self.embed_tokens, self.added_embeddings, ids_bt).astype(jnp.float32),
                          ACTIVATION_AXES)
        positions_bt = (positions_bt * real_bt).astype(jnp.int32)
        x_btd = run_layers(self.layers, x_btd, segments_bt.astype(jnp.int32), positions_bt, dropout_rng,
                           remat=self.remat)
        return self.norm(x_btd)
