"""HF checkpoint folder <-> NNX model: config.json + safetensors in, HF / sentence-transformers folder out (and a
sentence-transformers folder's pooling and max length read back).

Family-agnostic: the model's family (`dret.models`) supplies the config check, the backbone and the key table.
No torch at run time: weights are read with `safetensors`, each tensor (or, placed on a sharding, each device's
slice of it) when it is placed, so the host never holds them all. `pytorch_model.bin` is a pickle and is read
whole (without torch, see `dret.torch_pickle`) only when the caller passes `allow_pickle=True`; so is a PaddleNLP
folder's `model_state.pdparams` (see `dret.paddle_io`).
Key mapping is strict: a checkpoint key we cannot place, or a parameter the checkpoint lacks, is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from flax import nnx

from dret import gguf_io, models, paddle_io
from dret.errors import DretError
from dret.models import added_tokens
from dret.torch_pickle import load_torch_state_dict

log = logging.getLogger(__name__)

ST_CONFIG = "config_sentence_transformers.json"
# pooling dret has and sentence-transformers has not -> what sentence-transformers' nearest Pooling module computes
ST_STAND_IN_POOLING = {"latent": "mean", "last_8": "last"}
SAFETENSORS, SAFETENSORS_INDEX, PICKLE = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


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
    """The folder's config.json (a GGUF file's metadata), checked to describe a model we support (see
    `dret.models.config_of`)."""
    if gguf_io.is_gguf(path):
        return gguf_io.open_gguf(path).config
    if not os.path.isdir(path):
        raise DretError(f"model folder {path} does not exist")
    if paddle_io.is_paddle(path):
        return paddle_io.hf_config(read_json(paddle_io.config_file(path)), paddle_io.config_file(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DretError(f"{path} has no config.json: expected an HF model folder (config.json + model.safetensors)")
    hf = read_json(config_file)
    models.config_of(hf, source=config_file)
    return hf


@dataclasses.dataclass(frozen=True)
class Weights:
    """A folder's tensors by checkpoint name, each read when asked for: whole, or one slice (safetensors files are
    memory-mapped and read only that slice; a pickle is read whole when opened)."""

    shapes: dict[str, tuple[int, ...]]
    files: dict[str, str]  # checkpoint name -> the file that holds it
    slice_of: Callable[[str, tuple], np.ndarray]  # (name, index) -> tensor[index]

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """tensor[index], if it holds no NaN or Inf (which would make every vector NaN, and every metric 0)."""
        value = self.slice_of(name, index)
        if value.dtype.kind not in "biu" and not np.isfinite(value).all():
            raise DretError(f"{self.files[name]}: tensor {name!r} holds non-finite values (NaN or Inf): "
                            "expected finite weights")
        return value


def _unreadable(file: str, e: Exception) -> DretError:
    return DretError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})")


def _open_safetensors(files: list[str]) -> Weights:
    handles, shapes, owners = {}, {}, {}
    for file in files:
        try:  # safetensors raises its own error types for truncated or corrupt files
            handles[file] = safetensors.safe_open(file, framework="numpy")
            for name in handles[file].keys():
                shapes[name], owners[name] = tuple(handles[file].get_slice(name).get_shape()), file
        except Exception as e:
            raise _unreadable(file, e) from None

    def slice_of(name: str, index: tuple) -> np.ndarray:
        try:
            return handles[owners[name]].get_slice(name)[index]
        except Exception as e:
            raise _unreadable(owners[name], e) from None
    return Weights(shapes, owners, slice_of)


def _shard_files(path: str, index_file: str) -> list[str]:
    """The shard files an index names, each inside the model folder."""
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DretError(f"{index_file}: expected a \"weight_map\" object of tensor name -> shard file, "
                        f"got {weight_map!r:.80}")
    return [path_inside(path, shard, index_file) for shard in sorted(set(weight_map.values()))]


def open_weights(path: str, *, allow_pickle: bool = False) -> Weights:
    """The folder's tensors: model.safetensors, sharded safetensors with an index, or (opt-in) the .bin; or a GGUF
    file's, dequantised to float32."""
    if gguf_io.is_gguf(path):
        g = gguf_io.open_gguf(path)
        whole = functools.lru_cache(maxsize=1)(g.tensor)  # a parameter's device slices are read one after another
        return Weights(g.shapes, dict.fromkeys(g.shapes, path), lambda name, index: whole(name)[index])
    if paddle_io.is_paddle(path):
        return _in_memory(paddle_io.read_tensors(path, read_config(path), allow_pickle=allow_pickle),
                          os.path.join(path, paddle_io.WEIGHTS))
    single, index, pickled = (os.path.join(path, n) for n in (SAFETENSORS, SAFETENSORS_INDEX, PICKLE))
    if os.path.isfile(single):
        return _open_safetensors([single])
    if os.path.isfile(index):
        return _open_safetensors(_shard_files(path, index))
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise DretError(f"{pickled} is a pickle, which can run arbitrary code when loaded: pass "
                            "allow_pickle=True (--allow_pickle) only if you trust it, or convert it to safetensors")
        try:
            tensors = load_torch_state_dict(pickled)
        except Exception as e:
            raise DretError(f"{pickled}: cannot read it as a PyTorch state dict ({e})") from None
        return _in_memory(tensors, pickled)
    raise DretError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")


def _in_memory(tensors: dict[str, np.ndarray], file: str) -> Weights:
    """Tensors read whole from one pickle `file`."""
    return Weights({k: v.shape for k, v in tensors.items()}, dict.fromkeys(tensors, file),
                   lambda name, index: tensors[name][index])


_SAMPLES, _SAMPLE_BYTES = 64, 4096


def weights_fingerprint(path: str) -> str:
    """A content fingerprint of a model: its GGUF file, or its folder's config.json and weight files, each by size
    and 64 evenly spaced 4 KiB samples. A copy matches (names and dates do not count); another model of the same
    shape, or a fine-tune of this one, does not, and gigabytes are never read."""
    names = [os.path.basename(path)] if gguf_io.is_gguf(path) else sorted(
        n for n in os.listdir(path) if n in paddle_io.CONFIGS or n.endswith((".safetensors", ".bin", ".pdparams")))
    folder = os.path.dirname(path) if gguf_io.is_gguf(path) else path
    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{name}:{size}\n".encode())
            for offset in sorted({i * max(size - _SAMPLE_BYTES, 0) // (_SAMPLES - 1) for i in range(_SAMPLES)}):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


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
    """The folder's (or GGUF file's) tokenizer, checked to fit a model of `vocab_size` tokens."""
    if gguf_io.is_gguf(path):
        return gguf_io.load_tokenizer(gguf_io.open_gguf(path))
    check_tokenizer_files(path)
    for name in _TOKENIZER_JSON:
        if os.path.isfile(os.path.join(path, name)):
            read_json(os.path.join(path, name))
    try:
        tokenizer = (paddle_io.load_tokenizer(path) if paddle_io.is_paddle(path)
                     else transformers.AutoTokenizer.from_pretrained(path))
    except Exception as e:  # transformers and tokenizers raise many types for a broken tokenizer
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DretError(f"{path}: cannot load its tokenizer ({reason})") from None
    if 2 * len(tokenizer) < vocab_size:
        raise DretError(f"{path}: its tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                        f"{vocab_size}: expected the model's own tokenizer")
    return tokenizer


def load_model(path: str, *, hf: dict | None = None, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               allow_pickle: bool = False, shardings=None) -> tuple[nnx.Module, dict]:
    """HF folder -> (model with the folder's weights, its HF config dict); `hf` is that dict when the caller has
    read it already (`read_config`).

    `shardings` (abstract nnx.State -> the matching tree of NamedShardings, e.g. `dret.sharding.state_shardings`)
    places each parameter straight onto its sharding, each device's slice read on its own; None puts every
    parameter whole on the default device. Rows for tokens past vocab_size (`hf["added_tokens"]`, which the
    folder does not hold) start as the mean of the folder's rows (`dret.models.added_tokens`).
    """
    hf = hf or read_config(path)
    family, cfg = models.family_of(hf), models.config_of(hf)
    weights = open_weights(path, allow_pickle=allow_pickle)
    prefix = family.checkpoint_prefix(weights.shapes, cfg)
    names = {k[len(prefix):] if k.startswith(prefix) else k: k for k in weights.shapes}  # ours -> checkpoint's
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(
        hf, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    new_rows = added_tokens.rows_path(family.VOCAB_TABLE)
    expected = {family.hf_name(p): p for p, _ in flat if p != new_rows}
    unused = sorted(k for k in names if k not in expected and family.UNUSED_KEYS.match(k))
    unexpected = sorted(k for k in names if k not in expected and k not in unused)
    missing = sorted(k for k in expected if k not in names)
    source = path if gguf_io.is_gguf(path) else os.path.join(path, "model weights")
    if unexpected or missing:
        raise DretError(f"{source}: keys do not match a {cfg.model_type} encoder: "
                        f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                        f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    if unused:
        log.info("%s: skipping %d keys embeddings do not use (%s...)", path, len(unused), unused[0])
    for p, var in flat:
        if p == new_rows:
            continue
        name, implied = names[family.hf_name(p)], _hf_layout(family, p, var.shape)
        if weights.shapes[name] != implied:
            raise DretError(f"{source}: {family.hf_name(p)} has shape {weights.shapes[name]}, config.json implies "
                            f"{implied}")
    placements = dict(nnx.to_flat_state(shardings(state))) if shardings is not None else None
    values = dict(flat)
    for p, var in flat:
        if p == new_rows:
            continue
        read = functools.partial(_read_param, weights, names[family.hf_name(p)], family.transposed(p), var.dtype)
        var.set_value(jnp.asarray(read((slice(None),) * len(var.shape))) if placements is None
                      else jax.make_array_from_callback(var.shape, placements[p], read))
    if new_rows in values:
        rows = added_tokens.initial_rows(values[family.VOCAB_TABLE].get_value(), values[new_rows].shape[0])
        values[new_rows].set_value(rows if placements is None else jax.device_put(rows, placements[new_rows]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), hf


def _hf_layout(family, path: tuple, x):
    """A parameter (or its shape) in HF's layout, from ours, or back: a transpose is its own inverse."""
    if not family.transposed(path):
        return x
    return tuple(reversed(x)) if isinstance(x, tuple) else x.T


def _read_param(weights: Weights, name: str, transposed: bool, dtype, index: tuple) -> np.ndarray:
    """Our `index` (a tuple of slices) of a parameter, read from its checkpoint tensor and cast to `dtype`."""
    value = weights.read(name, index[::-1] if transposed else index)
    return np.ascontiguousarray(value.T if transposed else value, dtype=dtype)


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors of the model (the inverse of `load_model`'s mapping)."""
    family = models.family_of({"model_type": model.config.model_type})
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {family.hf_name(p): np.ascontiguousarray(_hf_layout(family, p, np.asarray(jax.device_get(v.get_value()),
                                                                                     np.float32)))
            for p, v in flat}


_ST_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last"}  # sentence-transformers 6 `pooling_mode`
_ST_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_lasttoken": "last"}  # sentence-transformers 5


def read_sentence_transformers(path: str) -> tuple[str | None, int | None]:
    """(pooling, max_seq_length) from a sentence-transformers folder (5.x or 6.x layout), None where it says nothing."""
    pooling = max_len = None
    modules_file = os.path.join(path, "modules.json")
    if os.path.isfile(modules_file):
        for i, module in enumerate(read_json(modules_file, list)):
            if not (isinstance(module, dict) and isinstance(module.get("type"), str)):
                raise DretError(f"{modules_file}: entry {i}: expected an object with a \"type\", got {module!r:.80}")
            if module["type"].endswith("Pooling"):
                folder = path_inside(path, module.get("path", ""), modules_file)
                pooling = _read_pooling(os.path.join(folder, "config.json"))
        max_len = _max_seq_length(os.path.join(path, "sentence_bert_config.json"))
        # sentence-transformers 6 keeps it as the tokenizer's model_max_length (huge where unlimited)
        tokenizer_max = _json_field(os.path.join(path, "tokenizer_config.json"), "model_max_length")
        max_len = max_len or (tokenizer_max if _is_positive_int(tokenizer_max) else None)
    pooling = read_dret_settings(path).get("pooling", pooling)  # what sentence-transformers cannot say
    return pooling, (max_len if max_len and max_len < 1_000_000 else None)


def _read_pooling(file: str) -> str | None:
    """The pooling a sentence-transformers Pooling config names, None if not exactly one we support."""
    cfg = read_json(file)
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
    return read_json(path).get(key) if os.path.isfile(path) else None


def read_prompts(path: str) -> dict[str, str]:
    """The instructions a sentence-transformers folder names in its config ({"query": ..., "document": ...}; {} when
    none): what `encode_query` / `encode_document` prefix, and what dret.eval uses unless told otherwise."""
    file = os.path.join(path, ST_CONFIG)
    prompts = _json_field(file, "prompts")
    if prompts is None:
        return {}
    if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
        raise DretError(f"{file}: prompts: expected an object of name -> instruction text, got {prompts!r:.80}")
    return prompts


def read_dret_settings(path: str) -> dict:
    """What dret wrote under "dret" in a folder's sentence-transformers config ({} when nothing): the pooling and the
    prompt_format, which sentence-transformers has no field for."""
    file = os.path.join(path, ST_CONFIG)
    settings = read_json(file).get("dret", {}) if os.path.isfile(file) else {}
    if not (isinstance(settings, dict) and all(isinstance(settings.get(k, ""), str)
                                               for k in ("pooling", "prompt_format"))):
        raise DretError(f"{file}: dret: expected an object with string pooling and prompt_format, "
                        f"got {settings!r:.80}")
    return settings


def sentence_transformers_note(pooling: str, prompt_format: str) -> str | None:
    """Why sentence-transformers would compute other vectors than dret from an exported folder (None: it computes
    the same)."""
    reasons = []
    if pooling == "latent":
        reasons.append("it cannot run the latent-attention block (NV-Embed): it would mean-pool the decoder's states")
    if pooling == "last_8":
        reasons.append("it has no last_8 pooling (the mean of the last 8 tokens): it would take the last token")
    if prompt_format:
        reasons.append(f"it has no {prompt_format} prompt format (dret.prompts): it would embed the bare text")
    return ("sentence-transformers does not reproduce this model's vectors: " + "; ".join(reasons) +
            ". Load the folder with dret (`Embedder.from_pretrained`, `dret.eval`)") if reasons else None


def _sentence_transformers_files(pooling: str, normalize: bool, dim: int, max_seq_length: int,
                                 prompts: dict[str, str], prompt_format: str) -> dict:
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    dret_settings = {"pooling": pooling, "prompt_format": prompt_format}
    pooling = ST_STAND_IN_POOLING.get(pooling, pooling)  # read back from dret_settings
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
            "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
            ST_CONFIG: {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine",
                        "dret": dret_settings}}


def save_folder(model: nnx.Module, hf_config: dict, tokenizer, out_dir: str, *, pooling: str, normalize: bool,
                max_seq_length: int, prompts: dict[str, str], prompt_format: str = "") -> None:
    """Write an HF folder that `transformers.AutoModel` and `SentenceTransformer` load (`prompts`: the
    instructions `encode_query` / `encode_document` prefix). Where sentence-transformers cannot reproduce the
    vectors (`sentence_transformers_note`), a README.md and a warning say so.

    Files are written to a temporary sibling and renamed into place, so a crash never leaves a half folder, and a
    failure leaves no temporary folder. An existing `out_dir` is refused, never replaced.
    """
    out_dir = os.path.normpath(out_dir)  # "exported/" -> "exported": the sibling must not be inside it
    if os.path.lexists(out_dir):
        raise DretError(f"{out_dir} already exists: choose a new folder or remove it first")
    staging = f"{out_dir}.tmp-{os.getpid()}"
    try:
        _write_files(model, hf_config, tokenizer, staging, pooling=pooling, normalize=normalize,
                     max_seq_length=max_seq_length, prompts=prompts, prompt_format=prompt_format)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_files(model: nnx.Module, hf_config: dict, tokenizer, folder: str, *, pooling: str, normalize: bool,
                 max_seq_length: int, prompts: dict[str, str], prompt_format: str) -> None:
    os.makedirs(os.path.join(folder, "1_Pooling"))
    if normalize:
        os.makedirs(os.path.join(folder, "2_Normalize"))
    hf_class = models.family_of(hf_config).HF_CLASSES[hf_config["model_type"]]
    config = dict(hf_config, architectures=[hf_class], torch_dtype="float32")
    files = {"config.json": config, **_sentence_transformers_files(
        pooling, normalize, model.config.hidden_size, max_seq_length, prompts, prompt_format)}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    note = sentence_transformers_note(pooling, prompt_format)
    if note:
        log.warning("%s: %s", folder, note)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(f"{note}\n")
    weights_file = os.path.join(folder, SAFETENSORS)
    try:
        safetensors.numpy.save_file(state_dict(model), weights_file, metadata={"format": "pt"})
    except safetensors.SafetensorError as e:  # disk full arrives as this, not as an OSError
        raise DretError(f"{weights_file}: cannot write it ({str(e).splitlines()[0]})") from None
    tokenizer.save_pretrained(folder)
