"""Training: compile once, what trains, exact resume after SIGKILL, SIGTERM, CLI, export."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import nnx

from dret import peft
from dret.eval import hooks
from dret.eval.run import evaluate_beir
from dret.inference import load_checkpoint
from dret.model import Embedder
from dret.sharding import batch_sharding
from dret.train_step import accumulated_grads, micro_batch_loss
from dret.trainer import train_and_evaluate
from tests.train_util import ROOT, new_run, run_train, tiny_config, train_command


def step_history(run, n):
    """n steps of a fresh run, as the trainer feeds them: (state, each step's metrics)."""
    state, sharding, history = run.state, batch_sharding(run.mesh), []
    for batch in run.data.batches(n):
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        state, metrics = run.step_fn(state, batch, run.step_config)
        history.append(jax.device_get(metrics))
    return state, history


def steps(run, n):
    """n steps of a fresh run: (state, the last step's metrics)."""
    state, history = step_history(run, n)
    return state, history[-1]


def flat(state) -> dict:
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


def test_step_compiles_once_over_three_steps(tmp_path):
    """The jit cache (shared by every jit of train_step in this process) grows by at most one entry."""
    from dret.sharding import batch_sharding

    run = new_run(tiny_config(tmp_path))
    state, sharding, sizes = run.state, batch_sharding(run.mesh), [run.step_fn._cache_size()]
    for batch in run.data.batches(3):
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        state, metrics = run.step_fn(state, batch, run.step_config)
        sizes.append(run.step_fn._cache_size())
    metrics = jax.device_get(metrics)
    assert sizes[1] - sizes[0] <= 1 and sizes[1] == sizes[2] == sizes[3], sizes
    assert {"loss", "accuracy", "grad_norm", "param_norm", "skipped"} <= set(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0


def test_bitfit_trains_only_biases(tmp_path):
    run = new_run(tiny_config(tmp_path, fine_tune_type="bitfit"))
    before_params, before_frozen = flat(run.state.params), flat(run.state.frozen)
    state, _ = steps(run, 2)
    after_params, after_frozen = flat(state.params), flat(state.frozen)
    assert before_params and all(path[-1] == "bias" for path in before_params)
    assert all(np.array_equal(before_frozen[p], after_frozen[p]) for p in before_frozen)
    assert any(p[-1] == "kernel" for p in before_frozen)
    changed = [p for p in before_params if not np.array_equal(before_params[p], after_params[p])]
    assert len(changed) > len(before_params) // 2


def test_lora_trains_only_adapters_and_merges(tmp_path):
    config = tiny_config(tmp_path, fine_tune_type="lora", lora_rank=4, lora_alpha=8,
                         lora_target_modules=("query", "value"))
    run = new_run(config)
    before_params, before_frozen = flat(run.state.params), flat(run.state.frozen)
    state, _ = steps(run, 2)
    after_params, after_frozen = flat(state.params), flat(state.frozen)
    assert set(p[-1] for p in before_params) == {"kernel_lora_a", "kernel_lora_b"}
    assert {p[-2] for p in before_params} == {"query", "value"}
    assert all(np.array_equal(before_frozen[p], after_frozen[p]) for p in before_frozen)
    assert all(not np.array_equal(before_params[p], after_params[p]) for p in before_params
               if p[-1] == "kernel_lora_b")
    model = nnx.merge(run.step_config.graphdef, state.params, state.frozen)
    merged = flat(peft.merged_params(model, rank=4, alpha=8))
    q = ("layers", 0, "query")
    expected = (after_frozen[q + ("kernel",)]
                + after_params[q + ("kernel_lora_a",)] @ after_params[q + ("kernel_lora_b",)] * 2.0)
    np.testing.assert_allclose(merged[q + ("kernel",)], expected, rtol=1e-6)
    assert not any("lora" in str(p[-1]) for p in merged)


def exported(output_dir) -> dict:
    return safetensors.numpy.load_file(os.path.join(output_dir, "export", "model.safetensors"))


def test_exact_resume_after_sigkill(tmp_path):
    config = tiny_config(tmp_path / "a", max_steps=8, save_steps=2, logging_steps=2, passage_max_len=64)
    train_and_evaluate(config)
    reference = exported(config.output_dir)

    config.output_dir = str(tmp_path / "b" / "run")
    process = subprocess.Popen(train_command(config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert saved and max(saved) < 8, saved
    assert not os.path.exists(os.path.join(config.output_dir, "export"))

    resumed = run_train(config, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoints} at step {max(saved)}" in resumed.stderr  # dret's INFO lines are shown
    again = exported(config.output_dir)
    assert all(np.array_equal(again[k], reference[k]) for k in reference)
    rows = [json.loads(line)["step"] for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    assert rows == sorted(set(rows)) and rows[-1] == 8


def test_sigterm_saves_then_resume_finishes(tmp_path):
    config = tiny_config(tmp_path, max_steps=400, save_steps=1000, logging_steps=1000)
    process = subprocess.Popen(train_command(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics_started = os.path.join(config.output_dir, "tensorboard")
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.isdir(metrics_started):
        time.sleep(0.05)
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGTERM" in stderr
    assert "export:" not in stdout and "rerun the same command to resume" in stdout  # nothing was exported
    saved = [int(n) for n in os.listdir(os.path.join(config.output_dir, "checkpoints")) if n.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 400
    assert not os.path.exists(os.path.join(config.output_dir, "export"))


def test_export_cli_matches_end_of_training_export(tmp_path):
    config = tiny_config(tmp_path, fine_tune_type="lora", lora_rank=4, max_steps=2)
    train_and_evaluate(config)
    model, *_ , step = load_checkpoint(config.output_dir)
    assert step == 2
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(config.output_dir, "checkpoints", "2", "state"))
    saved = saved.item_metadata.tree
    assert not saved.get("frozen")  # LoRA checkpoints hold the adapters alone
    assert all("lora" in str(k) for layer in saved["params"]["layers"].values() for m in layer.values() for k in m)
    out = tmp_path / "exported"
    result = subprocess.run([*train_command(config)[:2], "dret.export", f"--checkpoint={config.output_dir}",
                             f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = safetensors.numpy.load_file(str(out / "model.safetensors")), exported(config.output_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_hook_logs_beir_metrics(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [f"document {i} about topic {i % 5}" for i in range(30)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n"
                                                for i in range(5)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n"
                                                                                  for i in range(5)))
    config = tiny_config(tmp_path, eval_data=str(beir), eval_steps=2, max_steps=4)
    export_dir = train_and_evaluate(config, hooks.from_config(config))
    rows = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval_ndcg_at_10" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["model_tflops_per_s"] > 0 and "mfu" not in r for r in rows if "loss" in r)  # no CPU peak known
    # the last evaluation saw the exported model: a direct evaluation of the export gives the same figures
    direct = evaluate_beir(Embedder.from_pretrained(export_dir), str(beir), "test", top_k=100,
                           query_max_length=config.query_max_len, passage_max_length=config.passage_max_len)
    for metric in hooks.LOGGED:
        assert evals[-1][f"eval_{metric}"] == pytest.approx(direct[metric], abs=1e-6), metric


def test_accumulation_averages_micro_batches_each_scored_against_its_own_passages(tmp_path):
    """gradient_accumulation_steps=2 gives the mean gradient of its two micro-batches: micro-batch a holds queries
    a, a+2, ... with their groups, and its negatives are its own passages (all devices', cross-device)."""
    config = tiny_config(tmp_path, gradient_accumulation_steps=2, negatives_cross_device=True)
    run = new_run(config)
    batch = run.data.batch(0, 0)
    b, g = batch["query_ids"].shape[0], config.train_group_size
    grads, losses, _ = jax.jit(accumulated_grads, static_argnums=2)(
        run.state, jax.device_put(batch, batch_sharding(run.mesh)), run.step_config)
    rng = jax.random.fold_in(run.state.rng, run.state.step)
    micro_loss = jax.jit(jax.value_and_grad(micro_batch_loss, has_aux=True), static_argnums=4)
    expected_losses, expected_grads = [], []
    for a in range(2):
        micro = {k: (v[a::2] if k.startswith("query") else v.reshape(b, g, -1)[a::2].reshape(b // 2 * g, -1))
                 for k, v in batch.items()}
        (loss, _), grads_a = micro_loss(run.state.params, run.state.frozen, micro, jax.random.fold_in(rng, a),
                                        run.step_config)
        expected_losses.append(float(loss))
        expected_grads.append(grads_a)
    np.testing.assert_allclose(np.asarray(losses), expected_losses, rtol=1e-5)
    mean_grads = jax.tree.map(lambda x, y: (x + y) / 2, *expected_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
