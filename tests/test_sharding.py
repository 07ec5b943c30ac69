"""Sharding: equal loss and gradients on every mesh and stage, per-shard negatives, global label order,
stage3 bytes per device, and a checkpoint written on 8 devices resumed on 4."""

import dataclasses

import jax
import numpy as np
import pytest

from dret.checkpoint import Checkpointer, abstract
from dret.plan import plan_stage
from dret.resources import resolve_model
from dret.sharding import (batch_sharding, bytes_per_device, grad_shardings, make_mesh, param_axes,
                           state_shardings)
from dret.train_step import batch_loss, micro_batch_loss, place
from tests.train_util import new_run, tiny_config

# (data, fsdp, tensor) meshes, each paired with a stage; (1, 1, 1) without sharding is the reference.
MESHES = [((1, 1, 1), ""), ((8, 1, 1), "stage1"), ((2, 4, 1), "stage3"), ((2, 2, 2), "stage2"),
          ((1, 4, 2), "stage3")]
RNG = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, run, numpy params, frozen and first batch): cross-device negatives, stage3 on a (1, 8, 1) mesh."""
    config = tiny_config(tmp_path_factory.mktemp("sharding"), negatives_cross_device=True, sharding="stage3")
    config.mesh.data, config.mesh.fsdp = 1, 8
    run = new_run(config)
    batch = run.data.batch(0, 0)
    return config, run, jax.device_get(run.state.params), jax.device_get(run.state.frozen), batch


def loss_and_grads(run, params, frozen, batch, mesh_shape, stage):
    """One micro-batch's loss and gradients with state, batch and gradients laid out as `stage` on the mesh."""
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    cfg = dataclasses.replace(run.step_config, grad_shardings=grad_shardings(mesh, params, stage))

    def fn(params, frozen, batch):
        (loss, _), grads = jax.value_and_grad(micro_batch_loss, has_aux=True)(params, frozen, batch, RNG, cfg)
        return loss, place(grads, cfg.grad_shardings)

    params = jax.device_put(params, state_shardings(mesh, params, fsdp_axes=param_axes(stage)))
    frozen = jax.device_put(frozen, state_shardings(mesh, frozen, fsdp_axes=param_axes(stage)))
    loss, grads = jax.jit(fn)(params, frozen, jax.device_put(batch, batch_sharding(mesh)))
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_loss_and_grads_equal_on_every_mesh_and_stage(tiny):
    _, run, params, frozen, batch = tiny
    ref_loss, ref_grads = loss_and_grads(run, params, frozen, batch, *MESHES[0])
    # float32 sums in another order: entries near 0 are held to 1e-5 of the largest gradient.
    atol = 1e-5 * max(np.abs(g).max() for g in ref_grads)
    for mesh_shape, stage in MESHES[1:]:
        loss, grads = loss_and_grads(run, params, frozen, batch, mesh_shape, stage)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"{mesh_shape} {stage}")
        for g, ref in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=atol,
                                       err_msg=f"{mesh_shape} {stage}")


def numpy_loss(q_bd, p_nd, group_size, temperature):
    """float64 InfoNCE: query i's target is passage i*G of p_nd."""
    logits_bn = q_bd.astype(np.float64) @ p_nd.astype(np.float64).T / temperature
    logits_bn -= logits_bn.max(-1, keepdims=True)
    logp_bn = logits_bn - np.log(np.exp(logits_bn).sum(-1, keepdims=True))
    return -logp_bn[np.arange(len(q_bd)), np.arange(len(q_bd)) * group_size].mean()


def sharded_loss(cfg, q_bd, p_nd, mesh_shape):
    mesh = make_mesh(*mesh_shape)
    q_bd, p_nd = jax.device_put((q_bd, p_nd), batch_sharding(mesh))
    loss, metrics = jax.jit(batch_loss, static_argnums=2)(q_bd, p_nd, cfg)
    return float(loss), float(metrics["accuracy"])


def test_without_cross_device_negatives_each_shard_scores_its_own_passages(tiny):
    cfg = dataclasses.replace(tiny[1].step_config, matryoshka=(), train_group_size=3, negatives_cross_device=False)
    rng = np.random.default_rng(0)
    q_bd, p_nd = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(48, 8)).astype(np.float32)
    expected = np.mean([numpy_loss(q_bd[2 * s:2 * s + 2], p_nd[6 * s:6 * s + 6], 3, cfg.temperature)
                        for s in range(8)])
    loss, _ = sharded_loss(cfg, q_bd, p_nd, (2, 4, 1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(sharded_loss(dataclasses.replace(cfg, negatives_cross_device=True), q_bd, p_nd, (2, 4, 1))[0],
                               numpy_loss(q_bd, p_nd, 3, cfg.temperature), rtol=1e-5)


def test_cross_device_labels_follow_the_global_passage_order(tiny):
    """Each device holds one query and its own 2 passages; query i matches only passage 2i of the global batch."""
    cfg = dataclasses.replace(tiny[1].step_config, matryoshka=(), train_group_size=2, negatives_cross_device=True)
    eye = np.eye(16, dtype=np.float32)
    q_bd, p_nd = eye[::2], eye  # passage n is one-hot n: distinct on every device
    for mesh_shape in ((8, 1, 1), (2, 4, 1)):
        loss, accuracy = sharded_loss(cfg, q_bd, p_nd, mesh_shape)
        assert accuracy == 1.0
        np.testing.assert_allclose(loss, numpy_loss(q_bd, p_nd, 2, cfg.temperature), rtol=1e-5, atol=1e-6)


def test_stage3_bytes_per_device_shrink_by_the_fsdp_factor(tiny):
    _, run, *_ = tiny  # stage3 on (data 1, fsdp 8, tensor 1)
    for name in ("params", "opt_state"):
        tree = getattr(run.state, name)
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        per_device = bytes_per_device(tree, jax.tree.map(lambda x: x.sharding, tree))
        assert per_device == sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
        # Only layer norms (and optimizer step counts) stay replicated: 0.1% of this model.
        assert total / 8 <= per_device <= total / 8 * 1.01, (name, total, per_device)


def test_plan_compiled_memory_agrees_with_eval_shape(tiny):
    config, run, *_ = tiny
    figures = plan_stage(config, resolve_model(config).hf, run.mesh, run.global_batch)
    assert figures["trainable"] == bytes_per_device(run.state.params,
                                                    jax.tree.map(lambda x: x.sharding, run.state.params))
    assert figures["frozen"] == 0  # sft: everything trains
    assert abs(figures["params_compiled"] - figures["trainable"]) <= 0.1 * figures["trainable"], figures
    assert abs(figures["opt_state_compiled"] - figures["opt_state"]) <= 0.1 * figures["opt_state"], figures
    assert figures["grads"] == figures["trainable"]  # float32, split 8 ways like the parameters
    assert 0 < figures["activations"] < figures["peak"]


def run_steps(run, state, batches, n):
    sharding = batch_sharding(run.mesh)
    for _ in range(n):
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in next(batches).items()}
        state, metrics = run.step_fn(state, batch, run.step_config)
    return state, float(metrics["loss"])


def test_checkpoint_from_8_devices_resumes_on_4_with_the_same_loss(tiny, tmp_path):
    config, run, *_ = tiny
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1)
    batches = run.data.batches(3)
    state, _ = run_steps(run, run.state, batches, 2)
    checkpointer.save(2, state, {"data": run.data.state()})
    checkpointer.close()
    _, loss_on_8 = run_steps(run, state, batches, 1)

    config.per_device_train_batch_size = 2  # the same global batch of 8 on 4 devices (fsdp 4)
    config.mesh.fsdp = -1
    run4 = new_run(config, devices=jax.devices()[:4])
    assert run4.global_batch == run.global_batch and run4.mesh.shape["fsdp"] == 4
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1)
    state4, meta = checkpointer.restore(2, abstract(run4.state))
    checkpointer.close()
    run4.data.restore(meta["data"])
    _, loss_on_4 = run_steps(run4, state4, run4.data.batches(1), 1)
    np.testing.assert_allclose(loss_on_4, loss_on_8, rtol=1e-5)
