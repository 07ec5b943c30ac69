"""HF checkpoint folder <-> NNX model: config.json + safetensors in, HF / sentence-transformers folder out.

No torch at run time: weights are read with `safetensors.numpy`. `pytorch_model.bin` is a pickle and is read
(without torch, see `dret.torch_pickle`) only when the caller passes `allow_pickle=True`.
Key mapping is strict: a checkpoint key we cannot place, or a parameter the checkpoint lacks, is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from dret.errors import DretError
from dret.models.bert import ARCHITECTURES, BertConfig, BertModel
from dret.torch_pickle import load_torch_state_dict

log = logging.getLogger(__name__)

SAFETENSORS, SAFETENSORS_INDEX, PICKLE = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
# Checkpoint parts that embeddings never use (task heads, the NSP pooler, buffers): skipped, and logged.
_UNUSED_KEYS = re.compile(r"^(pooler\.|cls\.|lm_head\.|classifier\.|qa_outputs\.|embeddings\.position_ids$)")
_HF_MODEL_CLASS = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
                   "ernie": "ErnieModel"}

# HF name (after the layer prefix) -> our module path; Linear weights are transposed ([out, in] <-> [in, out]).
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
_PARAM_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}


def _hf_name(path: tuple) -> str:
    """Our flat state path, e.g. ('layers', 3, 'query', 'kernel') -> 'encoder.layer.3.attention.self.query.weight'."""
    *module, param = path
    if module[0] == "layers":
        prefix = f"encoder.layer.{module[1]}." + {v: k for k, v in _LAYER_KEYS.items()}[module[2]]
    else:
        prefix = {v: k for k, v in _EMBEDDING_KEYS.items()}[tuple(module)]
    return f"{prefix}.{_PARAM_NAMES[param]}"


def _swap_layout(path: tuple, value):
    """HF Linear weights are [out, in], ours [in, out]; the swap is its own inverse."""
    return value.T if path[-1] == "kernel" else value


def read_config(path: str) -> dict:
    """The folder's config.json, checked to be a supported architecture."""
    if not os.path.isdir(path):
        raise DretError(f"model folder {path} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DretError(f"{path} has no config.json: expected an HF model folder (config.json + model.safetensors)")
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise DretError(f"{config_file}: not valid JSON ({e})") from None
    if hf.get("model_type") not in ARCHITECTURES:
        raise DretError(f"{config_file}: model_type {hf.get('model_type')!r} is not supported; "
                        f"supported: {', '.join(ARCHITECTURES)}")
    return hf


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise DretError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_weights(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of the folder: model.safetensors, sharded safetensors with an index, or (opt-in) the .bin."""
    single, index, pickled = (os.path.join(path, n) for n in (SAFETENSORS, SAFETENSORS_INDEX, PICKLE))
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(_read_safetensors(os.path.join(path, shard)))
        return weights
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise DretError(f"{pickled} is a pickle, which can run arbitrary code when loaded: pass "
                            "allow_pickle=True (--allow_pickle) only if you trust it, or convert it to safetensors")
        try:
            return load_torch_state_dict(pickled)
        except Exception as e:
            raise DretError(f"{pickled}: cannot read it as a PyTorch state dict ({e})") from None
    raise DretError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")


def _strip_prefix(weights: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Checkpoints of task models nest the encoder under `bert.` / `roberta.` / ...: drop that prefix."""
    for prefix in ("", f"{model_type.replace('-', '_')}.", "bert.", "roberta.", "ernie.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in weights:
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
    return weights


def load_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               allow_pickle: bool = False) -> tuple[BertModel, dict]:
    """HF folder -> (model with the checkpoint's weights, the HF config dict)."""
    hf = read_config(path)
    cfg = BertConfig.from_hf(hf)
    weights = _strip_prefix(read_weights(path, allow_pickle=allow_pickle), cfg.model_type)
    abstract = nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {_hf_name(p): p for p, _ in flat}
    unused = sorted(k for k in weights if k not in expected and _UNUSED_KEYS.match(k))
    unexpected = sorted(k for k in weights if k not in expected and k not in unused)
    missing = sorted(k for k in expected if k not in weights)
    source = os.path.join(path, "model weights")
    if unexpected or missing:
        raise DretError(f"{source}: keys do not match a {cfg.model_type} encoder: "
                        f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                        f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    if unused:
        log.info("%s: skipping %d keys embeddings do not use (%s...)", path, len(unused), unused[0])
    for p, var in flat:
        value = _swap_layout(p, weights[_hf_name(p)])
        if value.shape != var.shape:
            raise DretError(f"{source}: {_hf_name(p)} has shape {value.shape}, config.json implies "
                            f"{_swap_layout(p, np.empty(var.shape)).shape}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), hf


def state_dict(model: BertModel) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors of the model (the inverse of `load_model`'s mapping)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {_hf_name(p): np.ascontiguousarray(_swap_layout(p, np.asarray(jax.device_get(v.get_value()), np.float32)))
            for p, v in flat}


def _sentence_transformers_files(pooling: str, normalize: bool, dim: int, max_seq_length: int) -> dict:
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    if pooling not in modes:
        raise DretError(f"pooling {pooling!r} has no sentence-transformers equivalent; exportable: {', '.join(modes)}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling_config = {"word_embedding_dimension": dim, "pooling_mode_max_tokens": False,
                      "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                      "include_prompt": True, **{mode: name == pooling for name, mode in modes.items()}}
    return {"modules.json": modules, "1_Pooling/config.json": pooling_config,
            "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False}}


def export(model: BertModel, hf_config: dict, tokenizer, out_dir: str, *, pooling: str, normalize: bool,
           max_seq_length: int) -> None:
    """Write an HF folder that `transformers.AutoModel` and `SentenceTransformer` load.

    Files are written to a temporary sibling and renamed into place, so a crash never leaves a half folder.
    """
    if os.path.exists(out_dir):
        raise DretError(f"{out_dir} already exists: choose a new folder or remove it first")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(tmp, "1_Pooling"))
    if normalize:
        os.makedirs(os.path.join(tmp, "2_Normalize"))
    config = dict(hf_config, architectures=[_HF_MODEL_CLASS[hf_config["model_type"]]], torch_dtype="float32")
    files = {"config.json": config, **_sentence_transformers_files(
        pooling, normalize, model.config.hidden_size, max_seq_length)}
    for name, content in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    safetensors.numpy.save_file(state_dict(model), os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, out_dir)
