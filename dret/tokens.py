"""The reference's tokenizer switches (pad_token, add_bos_token, add_eos_token), set one way for training, evaluation
and export, and the check that an instruction leaves room for the text after it."""

from __future__ import annotations

import copy
import logging

from dret.errors import DretError

log = logging.getLogger(__name__)

PAD_TOKENS = ("unk_token", "eos_token", "pad_token")
PADDING_SIDES = ("right", "left")


def configure(tokenizer, *, pad_token: str = "", add_bos_token: int = -1, add_eos_token: int = -1, source: str):
    """A copy of `tokenizer` with the switches set; `source` names the model in messages.

    pad_token names the special token padding uses ("" = the tokenizer's own, else unk, else eos). Padding never
    changes a vector (it is masked), so a missing token falls back to eos with a warning (Llama-3 has no unk).
    add_bos_token / add_eos_token: 1 on, 0 off, -1 as the tokenizer does.
    """
    if pad_token and pad_token not in PAD_TOKENS:
        raise DretError(f"pad_token={pad_token!r}: expected one of {', '.join(PAD_TOKENS)} (the special token that "
                        "pads)")
    tok = copy.deepcopy(tokenizer)
    wanted = pad_token or ("pad_token" if tok.pad_token is not None else "unk_token")
    name = next((n for n in (wanted, "unk_token", "eos_token") if getattr(tok, n) is not None), None)
    if name is None:
        raise DretError(f"{source}: the tokenizer has no {wanted}, unk_token or eos_token to pad with: expected one")
    if name != wanted:
        log.warning("%s: the tokenizer has no %s: padding with its %s %r", source, wanted, name, getattr(tok, name))
    tok.pad_token = getattr(tok, name)
    for switch, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
        if value not in (-1, 0, 1):
            raise DretError(f"{switch}={value}: expected 1 (on), 0 (off) or -1 (the tokenizer's default)")
        if value != -1:
            if not hasattr(tok, switch):
                raise DretError(f"{switch}: the tokenizer of {source} has no such switch")
            setattr(tok, switch, bool(value))
    return tok


def check_instruction(tokenizer, instruction: str, max_length: int, name: str) -> None:
    """A DretError when `instruction` with the special tokens fills `max_length` tokens: every text would be cut to
    the instruction alone, and all vectors would be one."""
    if not instruction:
        return
    n = len(tokenizer(instruction, return_attention_mask=False, return_token_type_ids=False)["input_ids"])
    if n >= max_length:
        raise DretError(f"{name} {instruction[:40]!r}{'...' if len(instruction) > 40 else ''} is {n} tokens with the "
                        f"special tokens: a max length of {max_length} leaves no room for the text; expected a "
                        f"shorter instruction or a max length above {n}")
