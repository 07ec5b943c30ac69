"""Config checks: a bad flag, override or impossible setting is a one-line DretError before any work starts."""

from __future__ import annotations

import difflib
import logging
import math
import os
import re

import ml_collections
from absl import flags

from dret import models
from dret.demo_data import BUILTIN_TRAIN_DATA
from dret.errors import DretError, run_command
from dret.peft import FINE_TUNE_TYPES
from dret.pooling import POOLING_METHODS
from dret.prompts import FORMATS
from dret.resources import ModelSource, model_dir, resolve_model
from dret.sharding import parse_sharding
from dret.tokens import PAD_TOKENS, PADDING_SIDES

log = logging.getLogger(__name__)
# (fields, what each value must satisfy besides being finite, how the message says it)
NUMBER_RULES = (
    (("per_device_train_batch_size", "gradient_accumulation_steps", "train_group_size", "save_steps", "logging_steps",
      "save_total_limit", "eval_steps", "max_nonfinite_steps", "max_example_num_per_dataset", "lora_rank"),
     lambda v: v >= 1, " >= 1"),
    (("learning_rate", "temperature", "lora_alpha"), lambda v: v > 0, " > 0"),
    (("warmup_steps", "weight_decay", "max_grad_norm"), lambda v: v >= 0, " >= 0"),
    (("lora_dropout",), lambda v: 0 <= v < 1, " in [0, 1)"),
    (("margin",), lambda v: True, ""),
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's `flags_parser` for `app.run`: a bad flag, config file or override is one line on stderr, exit 2."""
    return run_command(_parse_flags, argv)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # ml_collections holds back a config file's load error until the config is used
        return rest
    except flags.Error as e:
        raise DretError(str(e)) from None
    except OSError as e:  # ml_collections could not load the config file: its last line says why
        raise DretError(f"--config {_flag_value(argv, 'config')}: {str(e).splitlines()[-1].strip()}") from None
    except (AttributeError, KeyError):  # ml_collections' way of saying an override names no field
        config = flags.FLAGS["config"].parser.parse(_flag_value(argv, "config"))
        problem = next(filter(None, (unknown_key(config, key) for key in _override_keys(argv))), None)
        if problem is None:  # raised by the config file's own code
            raise
        raise DretError(problem) from None


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to --name (as --name=V or --name V) in argv."""
    value = None
    for i, arg in enumerate(argv):
        flag, equals, after = arg.partition("=")
        if flag in (f"-{name}", f"--{name}"):
            value = after if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _override_keys(argv: list[str]) -> list[str]:
    """'a.b' of every --config.a.b=V (or --noconfig.a.b) in argv."""
    return [m[1] for arg in argv if (m := re.match(r"--?(?:no)?config\.([^=]+)", arg))]


def unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """Why `dotted` ('mesh.data') names no field of config, with the closest field; None when it names one."""
    node, parents = config, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config key {dotted!r} ({'.'.join(parents)} is a {type(node).__name__})"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {'.'.join(parents + close)!r}?)" if close else ""
            return f"unknown config key {dotted!r}{hint}"
        node = node[part]
        parents.append(part)
    return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DretError(f"config: {message}")


def validate(config) -> ModelSource:
    """Checks fields alone and in combination, then against the model's config.json; returns the model so resolved
    (its config.json is read once per run, here)."""
    c = config
    _require(c.fine_tune_type in FINE_TUNE_TYPES, f"fine_tune_type={c.fine_tune_type!r}: expected one of {FINE_TUNE_TYPES}")
    _require(c.sentence_pooling_method in POOLING_METHODS,
             f"sentence_pooling_method={c.sentence_pooling_method!r}: expected one of {POOLING_METHODS}")
    _require(c.prompt_format in ("", *FORMATS), f"prompt_format={c.prompt_format!r}: expected one of {FORMATS} or \"\"")
    _require(not (c.fp16 and c.bf16), "fp16 and bf16 are both set: choose one")
    _require(c.bf16 or not c.fp8, "fp8=True needs bf16=True (FP8 matmuls, bf16 everywhere else)")
    _require(c.fp16_opt_level in ("O0", "O1", "O2"), f"fp16_opt_level={c.fp16_opt_level!r}: expected O0, O1 or O2")
    for names, in_range, expected in NUMBER_RULES:
        for name in names:
            _require(math.isfinite(c[name]) and in_range(c[name]),
                     f"{name}={c[name]}: expected a finite number{expected}")
    _require(0 <= c.seed < 2**32, f"seed={c.seed}: expected an integer in [0, 2**32)")
    _require(c.num_train_epochs >= 1 or c.max_steps > 0, "num_train_epochs < 1 and max_steps <= 0: nothing to train")
    _require(not (c.use_inbatch_neg and c.train_group_size > 1),
             f"use_inbatch_neg scores one passage per query (the reference samples no negatives then): "
             f"set train_group_size=1 (it is {c.train_group_size})")
    _require(c.train_group_size > 1 or c.per_device_train_batch_size > 1 or c.negatives_cross_device,
             "train_group_size=1 with one query per device and no negatives_cross_device leaves no negatives")
    _require(c.padding_side in PADDING_SIDES, f"padding_side={c.padding_side!r}: expected one of {PADDING_SIDES}")
    _require(c.pad_token in ("", *PAD_TOKENS), f"pad_token={c.pad_token!r}: expected one of {PAD_TOKENS} or \"\"")
    for name in ("add_bos_token", "add_eos_token"):
        _require(c[name] in (-1, 0, 1), f"{name}={c[name]}: expected 1 (on), 0 (off) or -1 (the tokenizer's default)")
    _require(not c.eval_data or os.path.isdir(c.eval_data), f"eval_data={c.eval_data!r} is not a folder (BEIR layout)")
    try:
        parse_sharding(c.sharding)
    except DretError as e:
        raise DretError(f"config: {e}") from None
    if c.use_matryoshka:
        dims, weights = tuple(c.matryoshka_dims), tuple(c.matryoshka_loss_weights)
        _require(all(isinstance(d, int) and d > 0 for d in dims), f"matryoshka_dims {dims}: expected positive integers")
        _require(all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights),
                 f"matryoshka_loss_weights {weights}: expected finite numbers >= 0")
        _require(len(c.matryoshka_dims) == len(c.matryoshka_loss_weights) and c.matryoshka_dims,
                 f"matryoshka_dims {list(c.matryoshka_dims)} and matryoshka_loss_weights "
                 f"{list(c.matryoshka_loss_weights)} must be non-empty and of the same length")
    if c.train_data != BUILTIN_TRAIN_DATA and (c.train_data or not c.tiny):  # tiny: "" is the built-in data
        _require(bool(c.train_data) and os.path.exists(c.train_data),
                 f"train_data={c.train_data!r} does not exist (a .jsonl file or a folder of them)")
    if not c.tiny or model_dir(c):
        _require(bool(c.model_name_or_path), "model_name_or_path is empty")
    source = resolve_model(c)
    hf = source.hf
    if c.fine_tune_type == "lora":
        modules = models.family_of(hf).LORA_MODULES
        unknown = sorted(set(c.lora_target_modules) - set(modules))
        _require(not unknown, f"lora_target_modules {unknown} are not modules of the encoder ({modules})")
    latent_model = models.family_of(hf) is models.nvembed
    _require((c.sentence_pooling_method == "latent") == latent_model,
             f"sentence_pooling_method={c.sentence_pooling_method!r} with a {hf['model_type']} model: latent pooling "
             "is NV-Embed's block (model_type nvembed), and an NV-Embed model pools with it")
    model = models.config_of(hf)
    hidden, positions = model.hidden_size, model.max_text_length
    if c.use_matryoshka and not c.tiny:
        too_big = [d for d in c.matryoshka_dims if not 0 < d <= hidden]
        _require(not too_big, f"matryoshka_dims {too_big} exceed the model's hidden size {hidden} "
                 f"(set --config.matryoshka_dims to sizes <= {hidden})")
    longest = max(c.query_max_len, c.passage_max_len)
    _require(min(c.query_max_len, c.passage_max_len) >= 2 and longest <= positions,
             f"query_max_len={c.query_max_len} / passage_max_len={c.passage_max_len}: expected 2..{positions} "
             "(the model's longest text)")
    _warn_settings_that_change_nothing(c)
    return source


def _warn_settings_that_change_nothing(c) -> None:
    """The reference's flags dret accepts for its command lines but has no use for."""
    if c.use_flash_attention:
        log.warning("use_flash_attention changes nothing: GPUs use cuDNN flash attention whenever compute is half "
                    "precision, and other devices have none")
    if c.fp16 and c.fp16_opt_level == "O2":
        log.warning("fp16_opt_level=O2 computes as O1: matmuls in fp16, norms, softmax and the loss in float32, "
                    "float32 master weights")
