"""Prompt formats: how a query or passage becomes token ids for each recipe (pure functions, no jax).

    plain    instruction + text, truncated right (RepLLaMA, BERT-style models, NV-Embed's `Instruct: ..\\nQuery: `)
    bge_icl  FlagEmbedding's bge-en-icl: queries `{examples}<instruct>{task}\\n<query>{q}\\n<response>`, passages plain
    llara    FlagEmbedding's LLARA: `"{text}", summarize the above passage within eight words: <s1>..<s8>` (passages),
             `"{text}", predict the following passage within eight words: <s9>..<s16>` (queries)

The formats' marker tokens are special tokens (`add_special_tokens`, whose caller grows the model's embedding);
`encode` refuses a tokenizer that lacks them. BOS / EOS are the tokenizer's switches (`dret.tokens.configure`).
"""

from __future__ import annotations

import json
from typing import Sequence

from dret.errors import DretError

FORMATS = ("plain", "bge_icl", "llara")
ROLES = ("query", "passage")
ICL_SUFFIX = "\n<response>"
LLARA_PREFIX = '"'
LLARA_SUFFIXES = {
    "passage": '", summarize the above passage within eight words: ' + "".join(f"<s{i}>" for i in range(1, 9)),
    "query": '", predict the following passage within eight words: ' + "".join(f"<s{i}>" for i in range(9, 17)),
}
SPECIAL_TOKENS = {"plain": (), "bge_icl": ("<instruct>", "<query>", "<response>"),
                  "llara": tuple(f"<s{i}>" for i in range(1, 17))}
EXAMPLE_KEYS = ("instruct", "query", "response")


def _format(fmt: str) -> str:
    fmt = fmt or "plain"
    if fmt not in FORMATS:
        raise DretError(f"prompt_format={fmt!r}: expected one of {', '.join(FORMATS)} (\"\" = plain)")
    return fmt


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


def add_special_tokens(tokenizer, fmt: str) -> int:
    """Add the format's marker tokens (`<instruct>` `<query>` `<response>`, or `<s1>`..`<s16>`) as special tokens
    where the tokenizer lacks them; returns how many tokens the vocabulary grew by (0 when all were there): the
    caller grows the model's embedding to len(tokenizer)."""
    missing = [t for t in SPECIAL_TOKENS[_format(fmt)] if t not in tokenizer.get_added_vocab()]
    before = len(tokenizer)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return len(tokenizer) - before


def _require_special_tokens(tokenizer, fmt: str) -> None:
    missing = [t for t in SPECIAL_TOKENS[fmt] if t not in tokenizer.get_added_vocab()]
    if missing:
        raise DretError(f"prompt_format {fmt}: the tokenizer lacks {', '.join(missing)}: expected them added as "
                        "special tokens first (dret.prompts.add_special_tokens, which also sizes the embedding)")


def format_example(instruct: str, query: str, response: str) -> str:
    """One bge-en-icl in-context example."""
    return f"<instruct>{instruct}\n<query>{query}\n<response>{response}"


def instruction_length(tokenizer, instruction: str) -> int:
    """Tokens of `instruction` without special tokens: NV-Embed's (and PaddleNLP's) count of leading positions left
    out of the pooled mean (`pool_mask[:, :instruction_len] = 0`). With a BOS this leaves out the BOS and all but
    the instruction's last token; we keep the model's own rule so that vectors equal NV-Embed's."""
    return len(_ids(tokenizer, instruction)) if instruction else 0


def encode(fmt: str, tokenizer, texts: Sequence[str], *, role: str, max_length: int, instruction: str = "",
           examples: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
    """Token ids of `texts` as `role` ("query" / "passage") in format `fmt`, each at most max_length, with the
    tokenizer's special tokens (BOS / EOS as it is configured).

    plain: `tokenizer(instruction + text)` truncated right.
    llara: ids of '"' with the special tokens (BOS; a tokenizer that appends EOS is refused), then the text's ids
      (no special tokens) cut to what is left, then the role's suffix ids, as the reference joins them: the suffix
      always fits (the reference's total can exceed max_length). No instruction.
    bge_icl: passages as plain. A query is `{examples prefix}<instruct>{instruction}\\n<query>{text}\\n<response>`
      (an empty instruction: the bare text, as FlagEmbedding without a task). `examples` holds each text's
      in-context examples (`format_example`; evaluation passes one list for all: `[examples] * len(texts)`),
      joined by "\\n\\n" and followed by "\\n\\n". As FlagEmbedding does, `<instruct>..<query>{text}` is tokenized
      without special tokens, truncated, decoded back, and the whole string tokenized once with the special
      tokens. Fixed shapes: the whole query is at most max_length tokens; the `<instruct>..{text}` part is cut
      only so that it, `\\n<response>` and the special tokens fit; examples are kept whole, the first ones in
      order while they fit beside it, the rest left out (and the last kept dropped, or the text cut further,
      in the rare case that tokenizing the joined string takes more tokens than its parts).
    """
    fmt = _format(fmt)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    _require_special_tokens(tokenizer, fmt)
    if fmt == "llara":
        if instruction:
            raise DretError(f"prompt_format llara: {role} instruction {instruction[:40]!r} given: the format has "
                            "its own prompt; expected no instruction")
        return _llara(tokenizer, texts, LLARA_SUFFIXES[role], max_length, role)
    if fmt == "bge_icl" and role == "query":
        return _bge_icl_queries(tokenizer, texts, max_length, instruction, examples)
    return tokenizer([instruction + t for t in texts], truncation=True, max_length=max_length,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def _llara(tokenizer, texts, suffix: str, max_length: int, role: str) -> list[list[int]]:
    prefix_ids = tokenizer(LLARA_PREFIX, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    quote_ids = _ids(tokenizer, LLARA_PREFIX)
    if prefix_ids[-len(quote_ids):] != quote_ids:
        raise DretError("prompt_format llara: the tokenizer appends a special token (EOS) to every text: expected "
                        "add_eos_token=0 (the text must end with the 8 <s..> tokens that last_8 pools)")
    suffix_ids = _ids(tokenizer, suffix)
    room = max_length - len(prefix_ids) - len(suffix_ids)
    if room < 1:
        raise DretError(f"prompt_format llara: a {role} max length of {max_length} cannot hold the prompt "
                        f"({len(prefix_ids) + len(suffix_ids)} tokens) and a token of text: expected at least "
                        f"{max_length - room + 1}")
    text_ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=room,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return [prefix_ids + ids + suffix_ids for ids in text_ids]


def _examples_prefix(examples: Sequence[str]) -> str:
    return "\n\n".join(examples) + "\n\n" if examples else ""


def _bge_icl_queries(tokenizer, texts, max_length: int, instruction: str, examples) -> list[list[int]]:
    room = max_length - tokenizer.num_special_tokens_to_add() - len(_ids(tokenizer, ICL_SUFFIX))
    head = f"<instruct>{instruction}\n<query>" if instruction else ""
    n_prompt = max_length - room + len(_ids(tokenizer, head))
    if n_prompt >= max_length:
        raise DretError(f"prompt_format bge_icl: the query prompt ({n_prompt} tokens with the instruction "
                        f"{instruction[:40]!r}) leaves no room for the query in a max length of {max_length}: "
                        "expected a shorter instruction or a longer query_max_len")
    cores = tokenizer([head + t for t in texts], add_special_tokens=False, truncation=True, max_length=room,
                      return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    examples = examples if examples is not None else [()] * len(cores)
    if len(examples) != len(cores):
        raise ValueError(f"{len(examples)} example lists for {len(cores)} texts")
    prefix_lengths: dict[tuple[str, ...], int] = {}  # evaluation shares one list of examples: tokenize it once

    def fits(chosen: tuple[str, ...], space: int) -> bool:
        if chosen not in prefix_lengths:
            prefix_lengths[chosen] = len(_ids(tokenizer, _examples_prefix(chosen)))
        return prefix_lengths[chosen] <= space

    out = []
    for core_ids, own in zip(cores, examples):
        k = 0
        while k < len(own) and fits(tuple(own[:k + 1]), room - len(core_ids)):
            k += 1
        n_core = len(core_ids)
        while True:
            text = _examples_prefix(own[:k]) + tokenizer.decode(core_ids[:n_core]) + ICL_SUFFIX
            ids = tokenizer(text, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            excess = len(ids) - max_length
            if excess <= 0:
                break
            if k:
                k -= 1
            else:
                n_core = max(n_core - excess, 0)
        out.append(ids)
    return out


def read_examples(path: str) -> list[dict]:
    """An examples file for `dret.eval --examples_file`: a JSON list, or a .jsonl file with one object a line, of
    {"instruct": str, "query": str, "response": str} (other keys ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DretError(f"examples file {path}: cannot read it ({e})") from None
    if path.endswith(".jsonl"):
        items = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows = [(where, _json(where, line)) for where, line in items]
    else:
        data = _json(path, text)
        if not isinstance(data, list):
            raise DretError(f"examples file {path}: expected a JSON list of objects (or a .jsonl file), got "
                            f"{type(data).__name__}")
        rows = [(f"{path} item {i}", row) for i, row in enumerate(data)]
    if not rows:
        raise DretError(f"examples file {path}: no examples: expected at least one")
    for where, row in rows:
        if not isinstance(row, dict):
            raise DretError(f"examples file {where}: expected an object, got {type(row).__name__}")
        for key in EXAMPLE_KEYS:
            if not isinstance(row.get(key), str):
                got = "missing" if key not in row else f"got {type(row[key]).__name__}"
                raise DretError(f"examples file {where}: '{key}' must be a string ({got})")
    return [{key: row[key] for key in EXAMPLE_KEYS} for _, row in rows]


def _json(where: str, text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DretError(f"examples file {where}: not valid JSON ({str(e).splitlines()[0]})") from None
