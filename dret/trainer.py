"""The training loop: data -> jitted step -> metrics -> checkpoints -> evaluators (passed in) -> export.

Resume order (automatic when output_dir holds checkpoints and overwrite_output_dir is off):
  1. build model, optimizer and the abstract sharded state exactly as a fresh run would;
  2. restore the latest checkpoint's state onto those shardings (any mesh); checkpoints hold the trained
     variables and optimizer only (LoRA: the adapters alone), the frozen weights come from step 1;
  3. restore the data iterator's position from the checkpoint's meta (never skip batches by re-reading);
  4. drop metrics.jsonl rows logged after that checkpoint, then continue from its step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from dret import model_card
from dret import output_dir as run_folder
from dret.build import build_run
from dret.checkpoint import Checkpointer, abstract
from dret.config_check import validate
from dret.errors import DretError
from dret.flops import mfu_metrics
from dret.inference import CHECKPOINTS, embedder_of, publish
from dret.metrics_log import MetricsLog
from dret.model import Embedder
from dret.resources import ModelSource, base_fingerprint, check_base
from dret.sharding import batch_sharding

log = logging.getLogger(__name__)
EXPORT_DIR = "export"
Evaluator = Callable[[Embedder], dict]  # the trained model -> {metric name: value} for the training log


def train_and_evaluate(config, evaluators: tuple[Evaluator, ...] = ()) -> str | None:
    """Runs (or resumes) training; returns the export folder, or None when SIGTERM stopped the run first.
    Every eval_steps (and at the end) each evaluator scores the model and its values join the training log;
    `dret.eval.hooks.from_config(config)` builds the ones config.eval_data asks for."""
    source = validate(config)
    if config.eval_data and not evaluators:
        raise DretError(f"eval_data={config.eval_data!r} but no evaluator was passed: pass "
                        "dret.eval.hooks.from_config(config)")
    is_main = jax.process_index() == 0
    # multi-host: output_dir is shared, and only process 0 locks and clears it
    lock = run_folder.claim(config.output_dir, config.overwrite_output_dir) if is_main else None
    try:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("output_dir ready")
        return _train(config, source, evaluators, is_main)
    finally:
        if lock:
            lock.release()


def _train(config, source: ModelSource, evaluators: tuple[Evaluator, ...], is_main: bool) -> str | None:
    output_dir = config.output_dir
    run = build_run(config, source)
    state, data, total_steps, global_batch = run.state, run.data, run.total_steps, run.global_batch

    checkpointer = Checkpointer(os.path.join(output_dir, CHECKPOINTS), max_to_keep=config.save_total_limit)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        check_base(checkpointer.read_meta(start_step).get("base_model"), source, config,
                   os.path.join(checkpointer.directory, str(start_step)))
        saved, meta = checkpointer.restore(start_step, abstract(state.replace(frozen=None)))
        state = saved.replace(frozen=state.frozen)
        data.restore(meta["data"])
        log.info("resumed from %s at step %d", checkpointer.directory, start_step)

    sharding = batch_sharding(run.mesh)
    logs = MetricsLog(output_dir, start_step=start_step, total_steps=total_steps, enabled=is_main)
    base_model = base_fingerprint(source, config)  # what a LoRA or bitfit checkpoint leaves out
    meta = lambda: {"data": data.state(), "config": config.to_dict(), "base_model": base_model}  # noqa: E731

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    try:
        step, window_start, window_examples, window_tokens, window_flops = start_step, time.perf_counter(), 0, 0, 0.0
        for local_batch in data.batches(total_steps - start_step):
            batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
            state, metrics = run.step_fn(state, batch, run.step_config)
            step += 1
            window_examples += global_batch
            window_tokens += int(local_batch["query_mask"].sum() + local_batch["passage_mask"].sum()) \
                * jax.process_count()
            window_flops += run.model_flops.of_batch(local_batch) * jax.process_count()
            logs.advance()
            if int(state.nonfinite_run) >= config.max_nonfinite_steps:  # each was skipped; the state is sound
                raise DretError(f"{config.max_nonfinite_steps} non-finite steps in a row at step {step}: "
                                "lower learning_rate, or use bf16 instead of fp16")
            if step % config.logging_steps == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - window_start
                logs.write(step, {**metrics, "learning_rate": run.schedule(step - 1),
                                  "examples_per_s": window_examples / seconds,
                                  "tokens_per_s": window_tokens / seconds,
                                  **mfu_metrics(window_flops, seconds, run.mesh.devices.flat)})
                window_start, window_examples, window_tokens, window_flops = time.perf_counter(), 0, 0, 0.0
            if evaluators and (step % config.eval_steps == 0 or step == total_steps):
                embedder = embedder_of(nnx.merge(run.step_config.graphdef, state.params, state.frozen),
                                       run.hf_config, run.tokenizer, config)
                logs.write(step, {k: v for evaluate in evaluators for k, v in evaluate(embedder).items()})
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
        embedder = embedder_of(nnx.merge(run.step_config.graphdef, state.params, state.frozen), run.hf_config,
                               run.tokenizer, config)
        publish(embedder, export_dir, model_card.training_card(config, output_dir=output_dir, step=step,
                                                               data_files=data.files, dim=embedder.dim))
    return export_dir
