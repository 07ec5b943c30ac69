"""The reference example's training flags (`--name value`, `--name=value`, a bare boolean `--name`) as
`--config.name=value` overrides, so its command lines run with only the program name changed.

The translation is syntactic: ml_collections still parses and type-checks every value, and both styles keep their
places on the command line, so when both set one field the later one wins. `--config FILE` moves to the front (the
overrides apply to it wherever it was written); without it the config is ml_configs/base.py. ml_collections reads
the overrides from sys.argv, so dret.train replaces sys.argv with the translation.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Collection

import ml_collections

from dret.errors import DretError
from ml_configs import base

# Reference flags with no meaning for dret.train, accepted (with a warning) when true: why each changes nothing.
IGNORED = {"do_train": "dret.train always trains"}
# Paddle's strtobool, as the reference's argument parser reads booleans.
BOOLEANS = {"true": True, "t": True, "yes": True, "y": True, "1": True,
            "false": False, "f": False, "no": False, "n": False, "0": False}


def fields() -> dict[str, object]:
    """base.py's top-level fields (the reference's flag names) -> their defaults; nested groups (mesh) excluded."""
    return {k: v for k, v in base.get_config().items() if not isinstance(v, ml_collections.ConfigDict)}


def translate(argv: list[str], passthrough: Collection[str]) -> list[str]:
    """argv (program name first) with each reference-style flag naming a base.py field rewritten as
    `--config.name=value`, and `--config FILE` (ml_configs/base.py when absent) moved to the front. Flags in
    `passthrough` (dret.train's and absl's own), `--config.*` overrides, single-dash flags, values and everything
    after `--` are kept as written. An unknown flag, a missing value or a non-boolean for a boolean flag is a
    DretError; the IGNORED flags used are named in one warning line on stderr."""
    defaults, config, out, ignored = fields(), [], [], []
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        name, equals, value = arg[2:].partition("=")
        if arg == "--":
            out += [arg, *rest]
            break
        if not arg.startswith("--") or "." in name:
            out.append(arg)
        elif name == "config":
            config += [arg] if equals or not rest else [arg, rest.pop(0)]
        elif name in defaults and isinstance(defaults[name], bool):
            out.append(f"--config.{name}={_boolean(name, equals, value, rest)}")
        elif name in defaults:
            out.append(f"--config.{name}={value if equals else _value(name, rest, isinstance(defaults[name], tuple))}")
        elif name in IGNORED:
            if not _boolean(name, equals, value, rest):
                raise DretError(f"--{name} false: {IGNORED[name]}; leave the flag out")
            ignored += [] if name in ignored else [name]
        elif name in passthrough or name.startswith("no") and name[2:] in passthrough:
            out.append(arg)
        else:
            close = difflib.get_close_matches(name, [*defaults, *IGNORED, *passthrough], n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise DretError(f"unknown flag --{name}{hint}: dret.train takes the reference's training flags "
                            "(the fields of ml_configs/base.py) and --config.key=value")
    if ignored:
        print(f"dret: warning: ignored {', '.join(f'--{n} ({IGNORED[n]})' for n in ignored)}", file=sys.stderr)
    return [argv[0], *(config or [f"--config={base.__file__}"]), *out]


def _boolean(name: str, equals: str, value: str, rest: list[str]) -> bool:
    """A boolean flag's value: after '=', else the next argument unless that is a flag, else True (bare flag)."""
    if not equals:
        value = rest.pop(0) if rest and not rest[0].startswith("-") else "true"
    if value.lower() not in BOOLEANS:
        raise DretError(f"--{name} {value}: expected true or false (or 1 / 0, yes / no), or no value for true")
    return BOOLEANS[value.lower()]


def _value(name: str, rest: list[str], many: bool) -> str:
    """The next argument (a value may start with '-': `--max_steps -1`); for a tuple field every argument up to the
    next `--` flag, as the reference's lists take (`--matryoshka_dims 64 128` -> '(64, 128,)', words quoted)."""
    values = []
    while rest and not rest[0].startswith("--") and (many or not values):
        values.append(rest.pop(0))
    if not values:
        raise DretError(f"--{name} expects a value")
    if len(values) == 1:
        return values[0]
    return "(" + ", ".join(v if _is_number(v) else repr(v) for v in values) + ",)"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
