"""A GGUF file (llama.cpp's format) -> an HF-style config dict, float32 tensors under HF checkpoint names, and the
tokenizer; no torch and no llama.cpp: the `gguf` package parses and dequantises.

Family-agnostic, like `dret.hf_io`: the family whose GGUF_ARCHITECTURES names the file's `general.architecture`
supplies the model_type, the tensor-name table (`from_gguf_name`) and any layout change llama.cpp's converter made
(`from_gguf_tensor`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import gguf
import numpy as np
import transformers
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from dret import models
from dret.errors import DretError

# `{architecture}.KEY` -> HF config field (the keys llama.cpp writes for Llama-style decoders)
_CONFIG_KEYS = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
                "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
                "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
                "context_length": "max_position_embeddings", "vocab_size": "vocab_size"}
_TOKEN_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
               "tokenizer.ggml.padding_token_id": "pad_token_id"}
# `{architecture}.rope.scaling.KEY` -> rope_scaling field
_ROPE_SCALING_KEYS = {"type": "rope_type", "factor": "factor", "original_context_length":
                      "original_max_position_embeddings"}


def is_gguf(path: str) -> bool:
    """Whether `path` names a GGUF file (by its extension) rather than a model folder."""
    return path.endswith(".gguf")


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """One parsed GGUF file: its HF-style config, and its tensors by HF checkpoint name (logical shape, and a
    reader that dequantises one whole to float32)."""

    file: str
    config: dict
    metadata: dict
    shapes: dict[str, tuple[int, ...]]
    tensor: Callable[[str], np.ndarray]


def open_gguf(file: str) -> GGUFFile:
    """`file` parsed (memory-mapped: tensors are read and dequantised only when asked for); parsed once while it
    is unchanged, for the config, the weights and the tokenizer of one load."""
    if not os.path.isfile(file):
        raise DretError(f"{file} does not exist")
    stat = os.stat(file)
    return _parsed(file, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parsed(file: str, mtime_ns: int, size: int) -> GGUFFile:
    try:  # the gguf package raises ValueError, struct.error, IndexError ... on a corrupt or truncated file
        reader = gguf.GGUFReader(file)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise DretError(f"{file} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    architecture = metadata.get("general.architecture")
    family = models.family_of_gguf(architecture, file)
    config = _config_of(metadata, architecture, family.GGUF_ARCHITECTURES[architecture])
    cfg = family.config_of(config, source=file)
    by_name = {family.from_gguf_name(t.name, file): t for t in reader.tensors}

    def tensor(name: str) -> np.ndarray:
        t = by_name[name]
        try:
            value = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise DretError(f"{file}: tensor {t.name!r} is of quantisation type {t.tensor_type.name}, which the gguf "
                            "package cannot dequantise: expected F32, F16, BF16 or a Q*/IQ* block type") from None
        return family.from_gguf_tensor(name, value.reshape(_shape(t)), cfg)
    return GGUFFile(file, config, metadata, {name: _shape(t) for name, t in by_name.items()}, tensor)


def _shape(t) -> tuple[int, ...]:
    """A tensor's logical (numpy, HF) shape: GGUF lists dimensions innermost first."""
    return tuple(int(n) for n in reversed(t.shape))


def _config_of(metadata: dict, architecture: str, model_type: str) -> dict:
    """The HF config dict the metadata describes; `dret.models.config_of` checks it."""
    hf = {"model_type": model_type}
    hf.update({field: metadata[f"{architecture}.{key}"] for key, field in _CONFIG_KEYS.items()
               if f"{architecture}.{key}" in metadata})
    hf.update({field: metadata[key] for key, field in _TOKEN_KEYS.items() if key in metadata})
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in metadata:
        hf["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    rotary = metadata.get(f"{architecture}.rope.dimension_count")
    if rotary is not None and "hidden_size" in hf and hf.get("num_attention_heads"):  # else config_of names the gap
        head_dim = hf["head_dim"] if "head_dim" in hf else hf["hidden_size"] // hf["num_attention_heads"]
        if rotary != head_dim:
            hf["partial_rotary_factor"] = rotary / head_dim  # the family's config check refuses partial RoPE
    scaling = {field: metadata[f"{architecture}.rope.scaling.{key}"] for key, field in _ROPE_SCALING_KEYS.items()
               if f"{architecture}.rope.scaling.{key}" in metadata}
    if scaling.get("rope_type", "none") != "none":
        hf["rope_scaling"] = scaling
    return hf


def load_tokenizer(g: GGUFFile) -> transformers.PreTrainedTokenizerFast:
    """The file's tokenizer, built as `AutoTokenizer.from_pretrained(folder, gguf_file=...)` builds it, from the
    metadata already parsed (transformers' own GGUF reader imports torch)."""
    groups = {group: {name: g.metadata[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in g.metadata} for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict.get("tokens", [])
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = g.metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
    try:  # transformers and tokenizers raise many types for a vocabulary they cannot build
        backend, _ = convert_gguf_tokenizer(g.metadata["general.architecture"], tokenizer_dict)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
    except Exception as e:
        raise DretError(f"{g.file}: cannot build its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
