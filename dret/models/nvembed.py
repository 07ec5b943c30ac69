"""NV-Embed-v1 (`model_type` nvembed): a Mistral decoder run bidirectionally (`dret.models.llama`, whatever its
text_config says) followed by the latent-attention block (`dret.models.latent`); the embedding is the masked mean
of the block's output (pooling "latent"), which leaves the query's instruction tokens out.

The family's surface is llama's (MODEL_TYPES, HF_CLASSES, `config_of`, `build`, `hf_name`, `transposed`,
`checkpoint_prefix`, UNUSED_KEYS, VOCAB_TABLE, LORA_MODULES / LORA_TARGETS, TINY) and bert's PaddleNLP one
(PADDLE_CLASSES, `from_paddle_config`, `from_paddle_name`, `from_paddle_tensor`). The checkpoint names are NV-Embed's:
`embedding_model.*` (the decoder's HF names) and `latent_attention_model.*`. Under LoRA only the adapters on the
decoder's projections train: the latent block stays as loaded (sft trains it with everything else).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dret.errors import DretError
from dret.models import llama
from dret.models.latent import LatentAttention, LatentConfig
from dret.models.layers import run_layers

HF_CLASSES = {"nvembed": "NVEmbedModel"}
MODEL_TYPES = tuple(HF_CLASSES)
LORA_MODULES = llama.LORA_MODULES
LORA_TARGETS = llama.LORA_TARGETS
TINY = dict(text_config=llama.TINY, latent_attention_config=dict(  # merged into the configs of those names
    num_latents_value=8, num_cross_heads=2, cross_dim_head=16, latent_dim=llama.TINY["hidden_size"],
    hidden_dim=llama.TINY["hidden_size"]))
GGUF_ARCHITECTURES = {}  # none: NV-Embed has no GGUF files
TEXT_MODEL_TYPES = {"bidir_mistral": "mistral"}  # NV-Embed's own text model types -> dret's


@dataclasses.dataclass(frozen=True)
class NVEmbedConfig:
    """The decoder's config (`text`, always bidirectional) and the latent block's (`latent`); the fields callers
    read from any backbone's config delegate to the decoder's."""

    text: llama.LlamaConfig
    latent: LatentConfig
    model_type: str = "nvembed"

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def max_text_length(self) -> int:
        return self.text.max_text_length


def _object(hf: dict, key: str, source: str) -> dict:
    if key not in hf:
        raise DretError(f"{source}: missing {key}")
    if not isinstance(hf[key], dict):
        raise DretError(f"{source}: {key}: expected an object, got {hf[key]!r:.80}")
    return hf[key]


def config_of(hf: dict[str, Any], source: str = "config.json") -> NVEmbedConfig:
    """The decoder's fields of `text_config` (NV-Embed's `bidir_mistral` read as mistral) and the block's sizes of
    `latent_attention_config`; a DretError naming `source` and the key for a missing or unusable value."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise DretError(f"{source}: model_type: expected nvembed, got {hf.get('model_type')!r:.80}")
    text_hf = _object(hf, "text_config", source)
    model_type = TEXT_MODEL_TYPES.get(text_hf.get("model_type"), text_hf.get("model_type"))
    text = llama.config_of({**text_hf, "model_type": model_type, "bidirectional": True}, f"{source}: text_config")
    latent = LatentConfig.from_hf(_object(hf, "latent_attention_config", source), text.hidden_size,
                                  f"{source}: latent_attention_config")
    return NVEmbedConfig(text=text, latent=latent)


def build(cfg: NVEmbedConfig, *, dtype, param_dtype, remat: bool, rngs: nnx.Rngs) -> NVEmbedModel:
    """The backbone of `cfg`."""
    return NVEmbedModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)


# --- HF checkpoint names, for import and export ------------------------------------------------------------------
# the decoder's unused names (llama.UNUSED_KEYS) under embedding_model.
UNUSED_KEYS = re.compile(r"^embedding_model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
_LATENT_NAMES = {  # our latent block's module -> NV-Embed's
    "norm": "cross_attend_blocks.0.norm", "norm_context": "cross_attend_blocks.0.norm_context",
    "to_q": "cross_attend_blocks.0.fn.to_q", "to_kv": "cross_attend_blocks.0.fn.to_kv",
    "to_out": "cross_attend_blocks.0.fn.to_out", "ff_norm": "cross_attend_blocks.1.norm",
    "ff_in": "cross_attend_blocks.1.fn.net.0", "ff_out": "cross_attend_blocks.1.fn.net.2",
}
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
VOCAB_TABLE = ("embedding_model", *llama.VOCAB_TABLE)  # the base token embeddings; added rows beside them


def hf_name(path: tuple) -> str:
    """Our flat state path -> NV-Embed's name, e.g. ('embedding_model', 'layers', 3, 'self_attn', 'q_proj', 'kernel')
    -> 'embedding_model.layers.3.self_attn.q_proj.weight', ('latent_attention_model', 'to_kv', 'kernel') ->
    'latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight'."""
    if path[0] == "embedding_model":
        return f"embedding_model.{llama.hf_name(path[1:])}"
    if path[1:] == ("latents",):
        return "latent_attention_model.latents"
    return f"latent_attention_model.{_LATENT_NAMES[path[1]]}.{_PARAM_NAMES[path[2]]}"


def transposed(path: tuple) -> bool:
    """Whether the HF tensor is ours transposed: Linear weights are [out, in] in HF, [in, out] here; the latents
    [num_latents, latent_dim] in both."""
    return path[-1] == "kernel"


def checkpoint_prefix(names, cfg: NVEmbedConfig) -> str:
    """"": NV-Embed's checkpoints name its two parts at the top."""
    return ""


# --- PaddleNLP checkpoints (matched to PaddleNLP's `transformers/nv_embed/modeling.py`, the port that
# slm/pipelines/examples/contrastive_training trains: NVEncodeModel(MistralModel) + LatentModel) --------------------
PADDLE_CLASSES = {"NVEncode": "nvembed"}  # PaddleNLP class-name stem -> model_type (config.json names NVEncodeModel)
_PADDLE_NUM_LATENTS = 512  # LatentModel.latents = Linear(hidden_size, 512)
# the MistralConfig fields PaddleNLP's MistralModel reads (its head_dim is hidden_size / num_attention_heads)
_PADDLE_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                     "pad_token_id", "bos_token_id", "eos_token_id")
_PADDLE_PREFIX = re.compile(r"^(mistral|model)\.")  # MistralModel's base_model_prefix; a wrapper's (LoRAModel) `model`
_PADDLE_LATENT_NAMES = {name.replace(".", "_"): name for name in _LATENT_NAMES.values()}  # the port's flat names


def from_paddle_config(paddle: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The HF NV-Embed config of the port's (flattened) MistralConfig: its decoder fields as text_config, and the
    latent block the port builds from them, whose inner size is max_position_embeddings (32768 in NV-Embed-v1 = 8
    heads x 4096) split into num_key_value_heads heads, with a max_position_embeddings / 2 wide feed-forward."""
    for key in ("hidden_size", "num_key_value_heads", "max_position_embeddings"):
        value = paddle.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise DretError(f"{source}: {key}: expected a positive integer, got {value!r:.80}")
    hidden, heads, inner = paddle["hidden_size"], paddle["num_key_value_heads"], paddle["max_position_embeddings"]
    if inner % heads:
        raise DretError(f"{source}: max_position_embeddings: expected a multiple of num_key_value_heads ({heads}), "
                        f"which split PaddleNLP's NV-Embed latent attention ({inner} wide) into heads, got {inner}")
    if inner != 8 * hidden:
        raise DretError(f"{source}: max_position_embeddings: expected 8 x hidden_size = {8 * hidden} (PaddleNLP's "
                        f"NV-Embed sizes its latent feed-forward max_position_embeddings / 2, NV-Embed's is 4 x "
                        f"hidden_size), got {inner}")
    text = {k: paddle[k] for k in _PADDLE_TEXT_KEYS if paddle.get(k) is not None}
    latent = dict(num_latents_value=_PADDLE_NUM_LATENTS, num_cross_heads=heads, cross_dim_head=inner // heads,
                  latent_dim=hidden, hidden_dim=hidden)
    return {"model_type": model_type, "hidden_size": hidden, "is_mask_instruction": True,
            "text_config": {**text, "model_type": "mistral"}, "latent_attention_config": latent}


def from_paddle_name(name: str) -> str:
    """A PaddleNLP checkpoint name (bare as NVEncodeModel.state_dict() gives it, or under `mistral.` / `model.`) ->
    NV-Embed's: 'layers.3.self_attn.q_proj.weight' -> 'embedding_model.layers.3.self_attn.q_proj.weight',
    'latent_model.cross_attend_blocks_0_fn_to_kv.weight' -> 'latent_attention_model.cross_attend_blocks.0.fn.to_kv
    .weight', 'latent_model.latents.weight' -> 'latent_attention_model.latents'; another latent_model name is kept
    (the key check reports it)."""
    name = _PADDLE_PREFIX.sub("", name)
    if not name.startswith("latent_model."):
        return f"embedding_model.{name}"
    module, _, param = name.removeprefix("latent_model.").rpartition(".")
    if module == "latents":
        return "latent_attention_model.latents"
    return f"latent_attention_model.{_PADDLE_LATENT_NAMES[module]}.{param}" if module in _PADDLE_LATENT_NAMES else name


def from_paddle_tensor(paddle_name: str, value):
    """A PaddleNLP tensor in NV-Embed's layout: paddle's Linear weights are [in, out], HF's [out, in]; the latents are
    a Linear(hidden_size, num_latents) weight whose transpose is NV-Embed's [num_latents, hidden_size]. Every 2-D
    tensor but the token embeddings is such a weight."""
    return value.T if value.ndim == 2 and not paddle_name.endswith("embed_tokens.weight") else value


# --- the model -----------------------------------------------------------------------------------------------------
class NVEmbedModel(nnx.Module):
    """Token ids [B, T] -> the latent block's output [B, T, D] in float32 (the pooling takes the masked mean)."""

    def __init__(self, cfg: NVEmbedConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.embedding_model = llama.LlamaModel(cfg.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.latent_attention_model = LatentAttention(cfg.latent, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids_bt, segments_bt, *, positions_bt=None, dropout_rng: jax.Array | None = None):
        """As `llama.LlamaModel` (segments 0 for padding; packed rows hold several texts), then the latent block
        token by token."""
        h_btd = self.embedding_model(ids_bt, segments_bt, positions_bt=positions_bt, dropout_rng=dropout_rng)
        unused_positions_bt = jnp.zeros_like(segments_bt)  # the block is per token: it reads no positions
        return run_layers([self.latent_attention_model], h_btd, segments_bt, unused_positions_bt, dropout_rng,
                          remat=self.remat)
