"""A PaddleNLP model folder (`config.json` or the older `model_config.json`, `model_state.pdparams`, `vocab.txt` +
`tokenizer_config.json`) -> an HF config dict, float32 tensors under HF checkpoint names and HF's layout, and the
tokenizer; no paddle and no paddlenlp.

Family-agnostic, like `dret.hf_io`: the family whose PADDLE_CLASSES names the config's class supplies the model_type,
the config translation (`from_paddle_config`), the tensor-name table (`from_paddle_name`) and the layout change
(`from_paddle_tensor`). `model_state.pdparams` is a pickle: it is read (see `dret.paddle_pickle`) only when the caller
passes `allow_pickle=True`.
"""

from __future__ import annotations

import os

import transformers
from tokenizers import Regex, pre_tokenizers

from dret import models
from dret.errors import DretError
from dret.paddle_pickle import load_paddle_state_dict

WEIGHTS = "model_state.pdparams"
CONFIGS = ("config.json", "model_config.json")  # PaddleNLP reads the first that exists
# PaddleNLP's BasicTokenizer also splits off every symbol (Unicode category S, and these code points) as one token,
# where BERT's keeps it in its word: `paddlenlp/transformers/tokenizer_utils.py` `_is_symbol`
_SYMBOL = Regex(r"[\p{S}\x{00B2}\x{00BA}\x{3007}\x{00B5}\x{00D8}\x{014B}\x{01B1}]")


def is_paddle(path: str) -> bool:
    """Whether `path` is a PaddleNLP model folder (by its weights file)."""
    return os.path.isfile(os.path.join(path, WEIGHTS))


def config_file(path: str) -> str:
    """The folder's config file: config.json, else model_config.json."""
    for name in CONFIGS:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise DretError(f"{path} has {WEIGHTS} but no config: expected {' or '.join(CONFIGS)} (a PaddleNLP model folder)")


def _flattened(config: dict) -> dict:
    """An old-style config's `init_args` objects merged in and `init_class` as `architectures`, as PaddleNLP's
    `flatten_model_config` does."""
    flat = {k: v for k, v in config.items() if k not in ("init_args", "init_class")}
    args = [a for a in config.get("init_args") or [] if isinstance(a, dict)] if isinstance(
        config.get("init_args"), list) else []
    for arg in args:
        flat.update({k: v for k, v in arg.items() if k not in flat and k != "init_class"})
    if "init_class" in config:
        flat["architectures"] = [config["init_class"]]
    elif "architectures" not in flat:
        flat["architectures"] = [a["init_class"] for a in args if "init_class" in a][:1]
    return flat


def hf_config(config: dict, source: str) -> dict:
    """The HF config dict of a PaddleNLP config file's content, checked to describe a model we support."""
    flat = _flattened(config)
    architectures = flat.get("architectures")
    class_name = architectures[0] if isinstance(architectures, list) and architectures else None
    family, model_type = models.family_of_paddle(class_name, flat.get("model_type"), source)
    hf = family.from_paddle_config(flat, model_type, source)
    hf["architectures"] = [family.HF_CLASSES[model_type]]
    models.config_of(hf, source=source)
    return hf


def read_tensors(path: str, hf: dict, *, allow_pickle: bool):
    """The folder's tensors under HF checkpoint names, in HF's layout (`hf` is the folder's `hf_config`)."""
    file = os.path.join(path, WEIGHTS)
    if not allow_pickle:
        raise DretError(f"{file} is a pickle, which can run arbitrary code when loaded: pass allow_pickle=True "
                        f"(--allow_pickle) only if you trust it, or convert it once with `python -m dret.convert "
                        f"{path} OUT_DIR --allow_pickle`")
    try:
        tensors = load_paddle_state_dict(file)
    except Exception as e:  # pickle raises many types for a corrupt or hostile file
        raise DretError(f"{file}: cannot read it as a PaddlePaddle state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    family = models.family_of(hf)
    return {family.from_paddle_name(name): family.from_paddle_tensor(name, value) for name, value in tensors.items()}


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    """The folder's WordPiece tokenizer (vocab.txt and tokenizer_config.json's do_lower_case), splitting as
    PaddleNLP's BERT / ERNIE / Chinese RoBERTa tokenizers do; without vocab.txt, the folder's HF tokenizer files
    (a decoder's, as PaddleNLP's NV-Embed port keeps them)."""
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        return transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.BertTokenizer.from_pretrained(path)
    backend = bert.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([backend.pre_tokenizer, pre_tokenizers.Split(_SYMBOL, "isolated")])
    special = {name: getattr(bert, name) for name in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=bert.model_max_length,
                                                **special)
