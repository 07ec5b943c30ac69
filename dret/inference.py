"""A trained model as an Embedder: from a live training state or a run folder's checkpoint (restored one way,
onto the state layout the trainer saves), a run's saved steps, and publishing an export folder. The trainer,
`dret.eval` and `dret.export` all use this module.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from dret import model_card, models, peft
from dret.checkpoint import Checkpointer
from dret.errors import DretError, one_line
from dret.model import Embedder
from dret.models import added_tokens
from dret.resources import build_backbone, check_base, resolve_model, tokenizer_of, with_tokens_of
from dret.sharding import make_mesh
from dret.train_step import make_optimizer, state_layout
from ml_configs import base

CHECKPOINTS = "checkpoints"  # under a run's output_dir


def embedder_of(model: nnx.Module, hf_config: dict, tokenizer, config, dtype=jnp.float32) -> Embedder:
    """A trained backbone as an Embedder with LoRA adapters merged, the rows of added tokens appended to the
    vocabulary (config vocab_size grown) and float32 weights, computing in `dtype` (for export, evaluation during
    training and dret.eval)."""
    params = (peft.merged_params(model, rank=config.lora_rank, alpha=config.lora_alpha)
              if config.fine_tune_type == "lora" else nnx.state(model, nnx.Param))
    flat, text = added_tokens.merged(dict(nnx.to_flat_state(params)), models.text_config(hf_config),
                                     models.family_of(hf_config).VOCAB_TABLE)
    hf_config = models.with_text_config(hf_config, text)
    plain = nnx.eval_shape(lambda: models.build(hf_config, dtype=dtype, rngs=nnx.Rngs(0)))
    backbone = nnx.merge(nnx.split(plain)[0], jax.tree.map(lambda x: x.astype(jnp.float32),
                                                           nnx.from_flat_state(flat)))
    return Embedder(backbone, tokenizer, hf_config, pooling=config.sentence_pooling_method,
                    normalize=config.normalized, max_length=config.passage_max_len, prompts=prompts_of(config),
                    prompt_format=config.prompt_format)


def prompts_of(config) -> dict[str, str]:
    """The instructions a run trained with, by sentence-transformers role (none when empty)."""
    return {role: text for role, text in (("query", config.query_instruction_for_retrieval),
                                          ("document", config.passage_instruction_for_retrieval)) if text}


def saved_steps(output_dir: str) -> list[int]:
    """The complete checkpoints of a training run, oldest first; a DretError for a folder that is not a run."""
    directory = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise DretError(f"{output_dir} holds no {CHECKPOINTS}/ folder: expected a dret training output_dir")
    checkpointer = Checkpointer(directory, writer=False)
    try:
        return sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()


def run_meta(output_dir: str, step: int) -> dict:
    """What a run saved beside its checkpoint at `step`: its config, data position and base model fingerprint."""
    checkpointer = Checkpointer(os.path.join(output_dir, CHECKPOINTS), writer=False)
    try:
        return checkpointer.read_meta(step)
    finally:
        checkpointer.close()


def config_of(meta: dict) -> ml_collections.ConfigDict:
    """The run config a checkpoint's meta holds; fields added to dret since it was saved keep their defaults."""
    config = base.get_config()
    config.update(meta["config"])
    return config


def run_config(output_dir: str, step: int) -> ml_collections.ConfigDict:
    """The config a run saved with its checkpoint at `step`."""
    return config_of(run_meta(output_dir, step))


def pick_step(output_dir: str, step: int | None) -> int:
    """`step`, or the latest, checked to be saved."""
    steps = saved_steps(output_dir)
    if not steps or (step is not None and step not in steps):
        raise DretError(f"{os.path.join(output_dir, CHECKPOINTS)}: no checkpoint at step "
                        f"{step if step is not None else 'any'}; saved: {steps}")
    return step if step is not None else steps[-1]


def load_checkpoint(output_dir: str, step: int | None = None):
    """(backbone with the checkpoint's weights, HF config, tokenizer, run config, step) of a training run.

    The trained variables are restored onto the run's own state layout (on this process's first device), the
    optimizer state is skipped, and the frozen weights come from the base model, as when a run resumes."""
    step = pick_step(output_dir, step)
    meta = run_meta(output_dir, step)
    config = config_of(meta)
    source = resolve_model(config)
    check_base(meta.get("base_model"), source, config, os.path.join(output_dir, CHECKPOINTS, str(step)))
    tokenizer = tokenizer_of(source, config)
    source = with_tokens_of(source, tokenizer)
    hf_config = source.hf
    backbone = build_backbone(source, config, dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params, frozen = peft.split_trainable(backbone, hf_config, config)
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    with config.unlocked():
        config.sharding = ""  # one device: no optimizer state offloaded to the host
    init, shardings = state_layout(params, None, make_optimizer(config, 1)[0], mesh, config)
    target = jax.eval_shape(jax.jit(init, out_shardings=shardings), params, None)  # carries the shardings
    target = target.replace(opt_state=jax.tree.map(lambda _: ocp.PLACEHOLDER, target.opt_state))  # not read
    checkpointer = Checkpointer(os.path.join(output_dir, CHECKPOINTS), writer=False)
    try:
        saved, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, saved.params, frozen), hf_config, tokenizer, config, step


def export_run(output_dir: str, step: int, export_dir: str) -> None:
    """A run's checkpoint at `step` published as `export_dir`, LoRA merged, with its model card."""
    meta = run_meta(output_dir, step)
    embedder = run_embedder(output_dir, step)
    card = model_card.training_card(config_of(meta), output_dir=output_dir, step=step,
                                    data_files=meta["data"].get("files", {}), dim=embedder.dim)
    publish(embedder, export_dir, card)


def run_embedder(output_dir: str, step: int | None = None, dtype=jnp.float32) -> Embedder:
    """A training run's checkpoint (default the latest) as an Embedder, LoRA merged."""
    model, hf_config, tokenizer, config, _ = load_checkpoint(output_dir, step)
    return embedder_of(model, hf_config, tokenizer, config, dtype=dtype)


def publish(embedder: Embedder, export_dir: str, card: str) -> None:
    """`embedder` saved as `export_dir` (an HF / sentence-transformers folder with `card` as its README.md),
    replacing an older export only once the new one is complete; a failed write (disk full) leaves the older export
    as it was and no partial folder."""
    staging = f"{os.path.normpath(export_dir)}.new"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed between the save and the rename below
    try:
        embedder.save(staging)  # complete or absent: the save itself writes to a temporary sibling first
        with open(os.path.join(staging, model_card.CARD), "w", encoding="utf-8") as f:
            f.write(card)
    except (OSError, DretError) as e:
        raise DretError(f"export to {export_dir} failed, the previous export is unchanged: {one_line(e)}") from e
    shutil.rmtree(export_dir, ignore_errors=True)
    os.rename(staging, export_dir)
