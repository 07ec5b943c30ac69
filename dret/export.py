"""`python -m dret.export --checkpoint OUTPUT_DIR [--step N] --out DIR`: a saved checkpoint -> HF folder."""

from __future__ import annotations

import os

from absl import app, flags
from absl import logging as absl_logging

from dret import inference
from dret.errors import DretError, run_command

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a training output_dir (holding checkpoints/)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step; default the latest")
_OUT = flags.DEFINE_string("out", None, "the new HF / sentence-transformers folder")


def export_checkpoint(checkpoint: str | None, step: int | None, out: str | None) -> None:
    if not checkpoint or not out:
        raise DretError("--checkpoint and --out are required")
    if os.path.lexists(out):
        raise DretError(f"{out} already exists: choose a new folder")
    step = inference.pick_step(checkpoint, step)
    inference.export_run(checkpoint, step, out)
    print(f"exported step {step} of {checkpoint} to {out}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    run_command(export_checkpoint, _CHECKPOINT.value, _STEP.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
