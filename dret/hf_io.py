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
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import transformers
from flax import nnx

from dret.errors import DretError
from dret.models.bert import BertConfig, BertModel
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


def read_json(file: str, expected: type = dict):
    """A JSON file's content, checked to be an object (`expected=dict`) or an array (`list`)."""
    if not os.path.isfile(file):
        raise DretError(f"{file} does not exist")
    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except UnicodeDecodeError as e:
        raise DretError(f"{file}: not UTF-8 text (byte {e.start}): expected JSON") from None
    except json.JSONDecodeError as e:
        raise DretError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(content, expected):
        raise DretError(f"{file}: expected {'an object' if expected is dict else 'a list'} at the top, "
                        f"got {type(content).__name__}")
    return content


def path_inside(folder: str, relative: str, source: str) -> str:
    """folder/relative, where `source` named `relative`; a DretError if the name leads outside the folder."""
    if not isinstance(relative, str) or os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == "..":
        raise DretError(f"{source}: {relative!r:.80}: expected a relative path inside the model folder {folder}")
    return os.path.join(folder, relative)


def read_config(path: str) -> dict:
    """The folder's config.json, checked to describe an encoder we support (see `BertConfig.from_hf`)."""
    if not os.path.isdir(path):
        raise DretError(f"model folder {path} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DretError(f"{path} has no config.json: expected an HF model folder (config.json + model.safetensors)")
    hf = read_json(config_file)
    BertConfig.from_hf(hf, source=config_file)
    return hf


def _checked_finite(file: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors, if none holds a NaN or Inf (which would make every vector NaN, and every metric 0)."""
    for key, value in tensors.items():
        if value.dtype.kind not in "biu" and not np.isfinite(value).all():
            raise DretError(f"{file}: tensor {key!r} holds non-finite values (NaN or Inf): expected finite weights")
    return tensors


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.numpy.load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise DretError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return _checked_finite(file, tensors)


def _shard_files(path: str, index_file: str) -> list[str]:
    """The shard files an index names, each inside the model folder."""
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DretError(f"{index_file}: expected a \"weight_map\" object of tensor name -> shard file, "
                        f"got {weight_map!r:.80}")
    return [path_inside(path, shard, index_file) for shard in sorted(set(weight_map.values()))]


def read_weights(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of the folder: model.safetensors, sharded safetensors with an index, or (opt-in) the .bin."""
    single, index, pickled = (os.path.join(path, n) for n in (SAFETENSORS, SAFETENSORS_INDEX, PICKLE))
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        weights = {}
        for shard in _shard_files(path, index):
            weights.update(_read_safetensors(shard))
        return weights
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise DretError(f"{pickled} is a pickle, which can run arbitrary code when loaded: pass "
                            "allow_pickle=True (--allow_pickle) only if you trust it, or convert it to safetensors")
        try:
            tensors = load_torch_state_dict(pickled)
        except Exception as e:
            raise DretError(f"{pickled}: cannot read it as a PyTorch state dict ({e})") from None
        return _checked_finite(pickled, tensors)
    raise DretError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")


# Each option is the set of files one tokenizer needs (BERT, RoBERTa, XLM-R / ERNIE sentencepiece, any fast one).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json + merges.txt", "sentencepiece.bpe.model",
                    "spiece.model", "tokenizer.model")
_TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(path: str) -> None:
    """A DretError unless the folder holds a tokenizer (without one, transformers builds a 5-token tokenizer that
    turns every word into [UNK])."""
    present = set(os.listdir(path))
    if not any(set(option.split(" + ")) <= present for option in _TOKENIZER_FILES):
        raise DretError(f"{path} has no tokenizer files: expected one of {', '.join(_TOKENIZER_FILES)}")


def load_tokenizer(path: str, vocab_size: int):
    """The folder's tokenizer, checked to fit a model of `vocab_size` tokens."""
    check_tokenizer_files(path)
    for name in _TOKENIZER_JSON:
        if os.path.isfile(os.path.join(path, name)):
            read_json(os.path.join(path, name))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers and tokenizers raise many types for a broken tokenizer
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DretError(f"{path}: cannot load its tokenizer ({reason})") from None
    if 2 * len(tokenizer) < vocab_size:
        raise DretError(f"{path}: its tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                        f"{vocab_size}: expected the model's own tokenizer")
    return tokenizer


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

    Files are written to a temporary sibling and renamed into place, so a crash never leaves a half folder, and a
    failure leaves no temporary folder. An existing `out_dir` is refused, never replaced.
    """
    out_dir = os.path.normpath(out_dir)  # "exported/" -> "exported": the sibling must not be inside it
    if os.path.lexists(out_dir):
        raise DretError(f"{out_dir} already exists: choose a new folder or remove it first")
    staging = f"{out_dir}.tmp-{os.getpid()}"
    try:
        _write_folder(model, hf_config, tokenizer, staging, pooling=pooling, normalize=normalize,
                      max_seq_length=max_seq_length)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_folder(model: BertModel, hf_config: dict, tokenizer, folder: str, *, pooling: str, normalize: bool,
                  max_seq_length: int) -> None:
    os.makedirs(os.path.join(folder, "1_Pooling"))
    if normalize:
        os.makedirs(os.path.join(folder, "2_Normalize"))
    config = dict(hf_config, architectures=[_HF_MODEL_CLASS[hf_config["model_type"]]], torch_dtype="float32")
    files = {"config.json": config, **_sentence_transformers_files(
        pooling, normalize, model.config.hidden_size, max_seq_length)}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    weights_file = os.path.join(folder, SAFETENSORS)
    try:
        safetensors.numpy.save_file(state_dict(model), weights_file, metadata={"format": "pt"})
    except safetensors.SafetensorError as e:  # disk full arrives as this, not as an OSError
        raise DretError(f"{weights_file}: cannot write it ({str(e).splitlines()[0]})") from None
    tokenizer.save_pretrained(folder)
