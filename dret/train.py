"""`python -m dret.train [--config ml_configs/X.py] [--config.key=value ...] [--key value ...]`: the reference's
flags (`--learning_rate 3e-5`, a bare `--recompute`) set the config's fields as `--config.key=value` does; when both
set one field, the later on the command line wins (see dret.reference_flags)."""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dret import reference_flags
from dret.config_check import parse_flags
from dret.errors import run_command
from dret.train_command import train_command

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file of ml_configs/ (default: ml_configs/base.py)",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "multi-host: host:port of process 0 (see launch/)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "multi-host: this process's index")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO; this sets root's level
    logging.getLogger("dret").setLevel(logging.INFO)  # so dret's own lines (resumed from ..., step N) still show
    run_command(train_command, _CONFIG.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _parse_flags(argv: list[str]) -> list[str]:
    """parse_flags on argv with the reference's flags translated to --config.key=value."""
    sys.argv[:] = run_command(reference_flags.translate, argv, list(flags.FLAGS))  # ml_collections reads sys.argv
    return parse_flags(sys.argv)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
