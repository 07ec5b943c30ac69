"""User-facing problems, and the one error boundary every command runs inside."""

from __future__ import annotations

import sys

EXIT_CODE = 2  # bad input or a failed write (absl and argparse also exit 2 on bad flags)


class DretError(Exception):
    """Bad input (files, configs, flags) or a failed write: its message is one line that says what to fix."""


def one_line(error: BaseException) -> str:
    """A DretError's message, or an OSError as 'path: cause' (disk full, permission, missing file)."""
    if isinstance(error, OSError) and error.strerror:
        where = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        message = f"{where}: {error.strerror}" if where else error.strerror
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def run_command(main, *args, **kwargs):
    """Calls `main`; a DretError or OSError ends the process with one line on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except (DretError, OSError) as e:
        print(f"dret: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
