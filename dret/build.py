"""A training run assembled from its config: mesh, tokenizer and data (checked before the model is built), the
model (+ LoRA), optimizer, the sharded train state and the jitted step; and the dry run's report."""

from __future__ import annotations

import dataclasses

import jax
import optax

from dret import output_dir as run_folder
from dret import models, peft
from dret.config_check import validate
from dret.data import TrainData
from dret.flops import ModelFlops
from dret.models import fp8
from dret.resources import ModelSource, build_backbone, resolve_train_data, tokenizer_of, with_tokens_of
from dret.sharding import data_parallel_size, make_mesh, param_axes, parse_sharding, state_shardings
from dret.train_step import StepConfig, TrainState, create_state, make_optimizer, make_step, precision


@dataclasses.dataclass
class Run:
    """Everything one training run is built from (fresh state; resume replaces `state`)."""

    mesh: jax.sharding.Mesh
    state: TrainState
    step_fn: object  # jit(train_step) with the state's shardings fixed, so it compiles once
    step_config: StepConfig
    schedule: optax.Schedule
    data: TrainData
    total_steps: int
    global_batch: int
    hf_config: dict
    tokenizer: object
    model_flops: ModelFlops  # a step's model FLOPs from its real tokens (MFU in the log)


def _tokenizer_and_data(config, source: ModelSource, mesh) -> tuple[object, int, TrainData]:
    """(tokenizer, global batch, the training files validated, cached as Arrow on first use, batched per host)."""
    tokenizer = tokenizer_of(source, config)
    global_batch = config.per_device_train_batch_size * data_parallel_size(mesh) * config.gradient_accumulation_steps
    return tokenizer, global_batch, TrainData(
        resolve_train_data(config), tokenizer, global_batch_size=global_batch, group_size=config.train_group_size,
        query_max_len=config.query_max_len, passage_max_len=config.passage_max_len,
        query_instruction=config.query_instruction_for_retrieval,
        passage_instruction=config.passage_instruction_for_retrieval, padding_side=config.padding_side,
        prompt_format=config.prompt_format, pool_instruction=not models.masks_instruction(source.hf),
        max_example_num_per_dataset=config.max_example_num_per_dataset, seed=config.seed,
        skip_bad_rows=config.skip_bad_rows, cache_dir=config.data_cache_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count())


def check_run(config) -> str:
    """`dry_run`: the config, output_dir, model folder (config.json and tokenizer; the weights are read when the
    run starts) and every training file, checked as the run would check them; returns what the run would do.
    Writes nothing but the data cache."""
    source = validate(config)
    entries = run_folder.check(config.output_dir, config.overwrite_output_dir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _, global_batch, data = _tokenizer_and_data(config, source, mesh)
    hf, text = source.hf, models.text_config(source.hf)
    folder = ("cleared first (overwrite_output_dir)" if config.overwrite_output_dir and entries else
              "resumed" if run_folder.RUN_MARKER in entries else "a new run")
    return (f"dry run: {len(data)} training rows -> {data.total_steps(config.num_train_epochs, config.max_steps)} "
            f"steps of {global_batch} queries x group {config.train_group_size} on mesh {dict(mesh.shape)}; model "
            f"{hf['model_type']} {text['num_hidden_layers']} x {text['hidden_size']}; output_dir {config.output_dir}: "
            f"{folder}")


def build_run(config, source: ModelSource, devices=None) -> Run:
    """Model (+ LoRA), data, optimizer and the sharded train state, as a fresh run starts (on `devices`, default all),
    for a config `validate` has checked and resolved to `source`. The weights are read straight onto their
    planned shardings (stage3: each device reads its slice only)."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    tokenizer, global_batch, data = _tokenizer_and_data(config, source, mesh)  # a bad row stops the run first
    source = with_tokens_of(source, tokenizer)
    dtype, param_dtype = precision(config)
    fsdp_axes = param_axes(parse_sharding(config.sharding)[0])
    backbone = build_backbone(source, config, dtype=dtype, param_dtype=param_dtype,
                              shardings=lambda state: state_shardings(mesh, state, fsdp_axes=fsdp_axes))
    if config.fp8:
        fp8.enable(backbone)  # training only: inference builds its backbone without
    hf_config = source.hf
    graphdef, params, frozen = peft.split_trainable(backbone, hf_config, config)
    total_steps = data.total_steps(config.num_train_epochs, config.max_steps)
    tx, schedule = make_optimizer(config, total_steps)
    state, shardings = create_state(params, frozen, tx, mesh, config)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, backbone.config.hidden_size)
    return Run(mesh=mesh, state=state, step_fn=step_fn, step_config=step_config, schedule=schedule, data=data,
               total_steps=total_steps, global_batch=global_batch, hf_config=hf_config, tokenizer=tokenizer,
               model_flops=ModelFlops.of(backbone, hf_config))
