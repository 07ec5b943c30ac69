"""`python -m dret.export --checkpoint OUTPUT_DIR [--step N] --out DIR`: a saved checkpoint -> HF folder."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from dret import peft
from dret.checkpoint import Checkpointer
from dret.errors import DretError, run_command
from dret.resources import build_backbone, tokenizer_of

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a training output_dir (holding checkpoints/)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step; default the latest")
_OUT = flags.DEFINE_string("out", None, "the new HF / sentence-transformers folder")


def _unbox(tree):
    """Saved nnx Variables are {'value': array}: strip that level to get a pure dict."""
    if isinstance(tree, dict):
        return tree["value"] if set(tree) == {"value"} else {k: _unbox(v) for k, v in tree.items()}
    return tree


def load_checkpoint(output_dir: str, step: int | None = None):
    """(backbone with the checkpoint's weights, HF config, tokenizer, run config, step) of a training run."""
    directory = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise DretError(f"{output_dir} holds no checkpoints/ folder: expected a dret training output_dir")
    checkpointer = Checkpointer(directory, max_to_keep=None)
    steps = checkpointer.all_steps()
    if not steps or (step is not None and step not in steps):
        raise DretError(f"{directory}: no checkpoint at step {step if step is not None else 'any'}; saved: {steps}")
    step = step if step is not None else max(steps)
    config = ml_collections.ConfigDict(checkpointer.read_meta(step)["config"])
    backbone, hf_config = build_backbone(config, dtype=jnp.float32, param_dtype=jnp.float32)
    tokenizer = tokenizer_of(config, hf_config)
    graphdef, params, frozen = peft.split_trainable(backbone, config)
    saved = checkpointer.restore_raw(step)
    checkpointer.close()
    nnx.replace_by_pure_dict(params, _unbox(saved["params"]))  # frozen weights are the base model's
    return nnx.merge(graphdef, params, frozen), hf_config, tokenizer, config, step


def export_checkpoint(checkpoint: str | None, step: int | None, out: str | None) -> None:
    from dret.trainer import export, inference_embedder

    if not checkpoint or not out:
        raise DretError("--checkpoint and --out are required")
    if os.path.lexists(out):
        raise DretError(f"{out} already exists: choose a new folder")
    model, hf_config, tokenizer, config, step = load_checkpoint(checkpoint, step)
    export(inference_embedder(model, hf_config, tokenizer, config), out)
    print(f"exported step {step} of {checkpoint} to {out}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    run_command(export_checkpoint, _CHECKPOINT.value, _STEP.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
