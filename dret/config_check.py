"""Config validation: every impossible setting is a one-line DretError before any work starts."""

from __future__ import annotations

import os

from dret.demo_data import BUILTIN_TRAIN_DATA
from dret.errors import DretError
from dret.model import POOLING_METHODS
from dret.peft import FINE_TUNE_TYPES
from dret.resources import hf_config_of, model_dir
from dret.sharding import parse_sharding

LORA_MODULES = ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DretError(f"config: {message}")


def validate(config) -> None:
    """Checks fields alone and in combination, including against the model's config.json."""
    c = config
    _require(c.fine_tune_type in FINE_TUNE_TYPES, f"fine_tune_type={c.fine_tune_type!r}: expected one of {FINE_TUNE_TYPES}")
    _require(c.sentence_pooling_method in POOLING_METHODS,
             f"sentence_pooling_method={c.sentence_pooling_method!r}: expected one of {POOLING_METHODS}")
    _require(not (c.fp16 and c.bf16), "fp16 and bf16 are both set: choose one")
    _require(c.fp16_opt_level in ("O0", "O1", "O2"), f"fp16_opt_level={c.fp16_opt_level!r}: expected O0, O1 or O2")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "train_group_size", "save_steps",
                 "logging_steps", "save_total_limit", "eval_steps", "max_nonfinite_steps", "max_example_num_per_dataset"):
        _require(c[name] >= 1, f"{name}={c[name]}: expected >= 1")
    _require(c.num_train_epochs >= 1 or c.max_steps > 0, "num_train_epochs < 1 and max_steps <= 0: nothing to train")
    _require(c.temperature > 0, f"temperature={c.temperature}: expected > 0")
    _require(c.learning_rate > 0, f"learning_rate={c.learning_rate}: expected > 0")
    _require(c.warmup_steps >= 0 and c.weight_decay >= 0, "warmup_steps and weight_decay must be >= 0")
    _require(not (c.use_inbatch_neg and c.train_group_size > 1),
             f"use_inbatch_neg scores one passage per query (the reference samples no negatives then): "
             f"set train_group_size=1 (it is {c.train_group_size})")
    _require(c.train_group_size > 1 or c.per_device_train_batch_size > 1 or c.negatives_cross_device,
             "train_group_size=1 with one query per device and no negatives_cross_device leaves no negatives")
    _require(not c.eval_data or os.path.isdir(c.eval_data), f"eval_data={c.eval_data!r} is not a folder (BEIR layout)")
    if c.fine_tune_type == "lora":
        unknown = sorted(set(c.lora_target_modules) - set(LORA_MODULES))
        _require(not unknown, f"lora_target_modules {unknown} are not modules of the encoder ({LORA_MODULES})")
        _require(c.lora_rank >= 1 and 0 <= c.lora_dropout < 1, "lora_rank must be >= 1 and lora_dropout in [0, 1)")
    try:
        parse_sharding(c.sharding)
    except DretError as e:
        raise DretError(f"config: {e}") from None
    if c.use_matryoshka:
        _require(len(c.matryoshka_dims) == len(c.matryoshka_loss_weights) and c.matryoshka_dims,
                 f"matryoshka_dims {list(c.matryoshka_dims)} and matryoshka_loss_weights "
                 f"{list(c.matryoshka_loss_weights)} must be non-empty and of the same length")
    if not c.tiny and c.train_data != BUILTIN_TRAIN_DATA:
        _require(bool(c.train_data) and os.path.exists(c.train_data),
                 f"train_data={c.train_data!r} does not exist (a .jsonl file or a folder of them)")
    if not c.tiny or model_dir(c):
        _require(bool(c.model_name_or_path), "model_name_or_path is empty")
    hf = hf_config_of(c)
    hidden, positions = hf["hidden_size"], hf.get("max_position_embeddings", 512)
    if c.use_matryoshka and not c.tiny:
        too_big = [d for d in c.matryoshka_dims if not 0 < d <= hidden]
        _require(not too_big, f"matryoshka_dims {too_big} exceed the model's hidden size {hidden} "
                 f"(set --config.matryoshka_dims to sizes <= {hidden})")
    longest = max(c.query_max_len, c.passage_max_len)
    _require(min(c.query_max_len, c.passage_max_len) >= 2 and longest <= positions,
             f"query_max_len={c.query_max_len} / passage_max_len={c.passage_max_len}: expected 2..{positions} "
             "(the model's max_position_embeddings)")
