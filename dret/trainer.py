"""The training loop: config -> data -> jitted step -> metrics -> checkpoints -> export.

Resume order (automatic when output_dir holds checkpoints and overwrite_output_dir is off):
  1. build model, optimizer and the abstract sharded state exactly as a fresh run would;
  2. restore the latest checkpoint's state onto those shardings (any mesh); checkpoints hold the trained
     variables and optimizer only (LoRA: the adapters alone), the frozen weights come from step 1;
  3. restore the data iterator's position from the checkpoint's meta (never skip batches by re-reading);
  4. drop metrics.jsonl rows logged after that checkpoint, then continue from its step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import multihost_utils

from dret import output_dir as run_folder
from dret import peft
from dret.checkpoint import Checkpointer, abstract
from dret.config_check import validate
from dret.data import TrainData
from dret.errors import DretError, one_line
from dret.eval.run import evaluate_beir
from dret.metrics_log import MetricsLog
from dret.model import Embedder
from dret.models.bert import BertConfig, BertModel
from dret.resources import build_backbone, hf_config_of, resolve_train_data, tokenizer_of
from dret.sharding import (OFFLOAD_MEMORY, batch_sharding, data_parallel_size, grad_shardings, make_mesh, opt_axes,
                           param_axes, parse_sharding, state_shardings)
from dret.train_step import StepConfig, TrainState, train_step

log = logging.getLogger(__name__)
EXPORT_DIR = "export"
EVAL_LOGGED = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")


def precision(config) -> tuple:
    """(compute dtype, parameter dtype). Master weights stay float32 in every mode."""
    if config.bf16:
        return jnp.bfloat16, jnp.float32
    if config.fp16 and config.fp16_opt_level != "O0":
        return jnp.float16, jnp.float32
    return jnp.float32, jnp.float32


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """AdamW, linear warmup then linear decay to 0, no decay on biases / norms (1-D), global-norm clipping."""
    warmup = min(config.warmup_steps, total_steps)
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
        optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1)),
    ], [warmup]) if warmup else optax.linear_schedule(config.learning_rate, 0.0, max(total_steps, 1))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def state_layout(params, frozen, tx, mesh, config):
    """(init(params, frozen) -> TrainState, the state's shardings); params may be abstract (dret.plan)."""
    stage, offload = parse_sharding(config.sharding)

    def init(params, frozen):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed), loss_scale=jnp.float32(2.0 ** 15 if config.fp16 else 1.0),
            finite_run=jnp.zeros((), jnp.int32), nonfinite_run=jnp.zeros((), jnp.int32))

    shapes = jax.eval_shape(init, params, frozen)
    # Optimizer moments are nnx Variables carrying their parameter's logical axes; counts are replicated.
    opt_shardings = state_shardings(mesh, shapes.opt_state, fsdp_axes=opt_axes(stage))
    if offload:
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind(OFFLOAD_MEMORY), opt_shardings)
    shardings = state_shardings(mesh, shapes, fsdp_axes=param_axes(stage)).replace(opt_state=opt_shardings)
    return init, shardings


def create_state(params, frozen, tx, mesh, config) -> tuple[TrainState, TrainState]:
    """The train state, born sharded (eval_shape -> shardings -> jit(init, out_shardings=)), and its shardings."""
    init, shardings = state_layout(params, frozen, tx, mesh, config)
    return jax.jit(init, out_shardings=shardings)(params, frozen), shardings


def make_step(config, graphdef, tx, mesh, params, shardings, hidden_size: int) -> tuple[StepConfig, object]:
    """(StepConfig, jit(train_step)) for a state laid out by `shardings`."""
    stage, offload = parse_sharding(config.sharding)
    # validate() keeps dims <= hidden size; only tiny runs (64 wide) drop the larger ones here.
    matryoshka = tuple((d, w) for d, w in zip(config.matryoshka_dims, config.matryoshka_loss_weights)
                       if d <= hidden_size) if config.use_matryoshka else ()
    device_memory = mesh.devices.flat[0].default_memory().kind
    step_config = StepConfig(
        graphdef=graphdef, tx=tx, pooling=config.sentence_pooling_method, normalized=config.normalized,
        group_size=config.train_group_size, temperature=config.temperature, margin=config.margin,
        use_inbatch_neg=config.use_inbatch_neg, matryoshka=matryoshka,
        accumulation=config.gradient_accumulation_steps,
        loss_shards=1 if config.negatives_cross_device else data_parallel_size(mesh),
        fp16=config.fp16 and config.fp16_opt_level != "O0", grad_shardings=grad_shardings(mesh, params, stage),
        # offload: the step moves the optimizer state to the device and back
        opt_device_shardings=tuple(s.with_memory_kind(device_memory) for s in jax.tree.leaves(shardings.opt_state))
        if offload else None, mesh=mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return step_config, jax.jit(train_step, static_argnums=2, donate_argnums=0, out_shardings=(shardings, replicated))


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


def _tokenizer_and_data(config, mesh) -> tuple[object, int, TrainData]:
    """(tokenizer, global batch, the training files validated, cached as Arrow on first use, batched per host)."""
    tokenizer = tokenizer_of(config, hf_config_of(config))
    global_batch = config.per_device_train_batch_size * data_parallel_size(mesh) * config.gradient_accumulation_steps
    return tokenizer, global_batch, TrainData(
        resolve_train_data(config), tokenizer, global_batch_size=global_batch, group_size=config.train_group_size,
        query_max_len=config.query_max_len, passage_max_len=config.passage_max_len,
        query_instruction=config.query_instruction_for_retrieval,
        passage_instruction=config.passage_instruction_for_retrieval,
        max_example_num_per_dataset=config.max_example_num_per_dataset, seed=config.seed,
        skip_bad_rows=config.skip_bad_rows, cache_dir=config.data_cache_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count())


def check_run(config) -> str:
    """`dry_run`: the config, output_dir, model folder (config.json and tokenizer; the weights are read when the
    run starts) and every training file, checked as the run would check them; returns what the run would do.
    Writes nothing but the data cache."""
    validate(config)
    entries = run_folder.check(config.output_dir, config.overwrite_output_dir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    _, global_batch, data = _tokenizer_and_data(config, mesh)
    hf = hf_config_of(config)
    folder = ("cleared first (overwrite_output_dir)" if config.overwrite_output_dir and entries else
              "resumed" if run_folder.RUN_MARKER in entries else "a new run")
    return (f"dry run: {len(data)} training rows -> {data.total_steps(config.num_train_epochs, config.max_steps)} "
            f"steps of {global_batch} queries x group {config.train_group_size} on mesh {dict(mesh.shape)}; model "
            f"{hf['model_type']} {hf['num_hidden_layers']} x {hf['hidden_size']}; output_dir {config.output_dir}: "
            f"{folder}")


def build_run(config, devices=None) -> Run:
    """Model (+ LoRA), data, optimizer and the sharded train state, as a fresh run starts (on `devices`, default all)."""
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    tokenizer, global_batch, data = _tokenizer_and_data(config, mesh)  # a bad row stops the run before the model
    dtype, param_dtype = precision(config)
    backbone, hf_config = build_backbone(config, dtype=dtype, param_dtype=param_dtype)
    graphdef, params, frozen = peft.split_trainable(backbone, config)
    total_steps = data.total_steps(config.num_train_epochs, config.max_steps)
    tx, schedule = make_optimizer(config, total_steps)
    state, shardings = create_state(params, frozen, tx, mesh, config)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, hf_config["hidden_size"])
    return Run(mesh=mesh, state=state, step_fn=step_fn, step_config=step_config, schedule=schedule, data=data,
               total_steps=total_steps, global_batch=global_batch, hf_config=hf_config, tokenizer=tokenizer)


def train_and_evaluate(config) -> str | None:
    """Runs (or resumes) training; returns the export folder, or None when SIGTERM stopped the run first."""
    validate(config)
    is_main = jax.process_index() == 0
    # multi-host: output_dir is shared, and only process 0 locks and clears it
    lock = run_folder.claim(config.output_dir, config.overwrite_output_dir) if is_main else None
    try:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("output_dir ready")
        return _train(config, is_main)
    finally:
        if lock:
            lock.release()


def _train(config, is_main: bool) -> str | None:
    output_dir = config.output_dir
    run = build_run(config)
    state, data, total_steps, global_batch = run.state, run.data, run.total_steps, run.global_batch

    checkpointer = Checkpointer(os.path.join(output_dir, "checkpoints"), max_to_keep=config.save_total_limit)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        saved, meta = checkpointer.restore(start_step, abstract(state.replace(frozen=None)))
        state = saved.replace(frozen=state.frozen)
        data.restore(meta["data"])
        log.info("resumed from %s at step %d", checkpointer.directory, start_step)

    sharding = batch_sharding(run.mesh)
    logs = MetricsLog(output_dir, start_step=start_step, total_steps=total_steps, enabled=is_main)
    meta = lambda: {"data": data.state(), "config": config.to_dict()}  # noqa: E731

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    try:
        step, window_start, window_examples, window_tokens = start_step, time.perf_counter(), 0, 0
        for local_batch in data.batches(total_steps - start_step):
            batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
            state, metrics = run.step_fn(state, batch, run.step_config)
            step += 1
            window_examples += global_batch
            window_tokens += int(local_batch["query_mask"].sum() + local_batch["passage_mask"].sum()) \
                * jax.process_count()
            logs.advance()
            if int(state.nonfinite_run) >= config.max_nonfinite_steps:  # each was skipped; the state is sound
                raise DretError(f"{config.max_nonfinite_steps} non-finite steps in a row at step {step}: "
                                "lower learning_rate, or use bf16 instead of fp16")
            if step % config.logging_steps == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - window_start
                logs.write(step, {**metrics, "learning_rate": run.schedule(step - 1),
                                  "examples_per_s": window_examples / seconds,
                                  "tokens_per_s": window_tokens / seconds})
                window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
            if config.eval_data and (step % config.eval_steps == 0 or step == total_steps):
                model = nnx.merge(run.step_config.graphdef, state.params, state.frozen)
                logs.write(step, evaluate_during_training(
                    inference_embedder(model, run.hf_config, run.tokenizer, config), config))
            if step % config.save_steps == 0 or step == total_steps or stop["signal"]:
                checkpointer.save(step, state.replace(frozen=None), meta())  # frozen weights: from the base model
            if stop["signal"]:
                log.warning("SIGTERM: saved a checkpoint at step %d; rerun the same command to resume", step)
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        checkpointer.close()
        logs.close()
    if stop["signal"]:
        return None
    export_dir = os.path.join(output_dir, EXPORT_DIR)
    if is_main:
        model = nnx.merge(run.step_config.graphdef, state.params, state.frozen)
        export(inference_embedder(model, run.hf_config, run.tokenizer, config), export_dir)
    return export_dir


def train_command(config, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """What `python -m dret.train` does once its flags are parsed (the fuzz tests call it in-process)."""
    from dret import distributed

    if config.dry_run:
        print(check_run(config))
        return
    distributed.initialize(coordinator_address, num_processes, process_id)
    export_dir = train_and_evaluate(config)
    if export_dir:
        print(f"export: {export_dir}")
    else:
        print(f"stopped by SIGTERM: a checkpoint is saved in {config.output_dir}; rerun the same command to resume")


def inference_embedder(model, hf_config, tokenizer, config, dtype=jnp.float32) -> Embedder:
    """The trained backbone as an Embedder with LoRA adapters merged and float32 weights, computing in `dtype`
    (for export, in-training eval and dret.eval)."""
    plain = nnx.eval_shape(lambda: BertModel(BertConfig.from_hf(hf_config), dtype=dtype, rngs=nnx.Rngs(0)))
    params = (peft.merged_params(model, rank=config.lora_rank, alpha=config.lora_alpha)
              if config.fine_tune_type == "lora" else nnx.state(model, nnx.Param))
    backbone = nnx.merge(nnx.split(plain)[0], jax.tree.map(lambda x: x.astype(jnp.float32), params))
    return Embedder(backbone, tokenizer, hf_config, pooling=config.sentence_pooling_method,
                    normalize=config.normalized, max_length=config.passage_max_len)


def evaluate_during_training(embedder: Embedder, config) -> dict[str, float]:
    """config.eval_data (a BEIR folder) through dret.eval, as `eval_<metric>` values for the training log."""
    results = evaluate_beir(embedder, config.eval_data, config.eval_split, top_k=100,
                            query_instruction=config.query_instruction_for_retrieval,
                            document_instruction=config.passage_instruction_for_retrieval,
                            query_max_length=config.query_max_len, passage_max_length=config.passage_max_len)
    return {f"eval_{k}": results[k] for k in EVAL_LOGGED}


def export(embedder: Embedder, export_dir: str) -> None:
    """An HF / sentence-transformers folder, replacing an older export only once the new one is complete; a failed
    write (disk full) leaves the older export as it was and no partial folder behind."""
    staging = f"{os.path.normpath(export_dir)}.new"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed between the save and the rename below
    try:
        embedder.save(staging)  # complete or absent: the save itself writes to a temporary sibling first
    except (OSError, DretError) as e:
        raise DretError(f"export to {export_dir} failed, the previous export is unchanged: {one_line(e)}") from e
    shutil.rmtree(export_dir, ignore_errors=True)
    os.rename(staging, export_dir)
