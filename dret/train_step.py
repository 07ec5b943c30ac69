"""The pure training step: (state, batch) -> (state, metrics). Jitted once, state donated.

Gradient accumulation scans micro-batches; a non-finite step is skipped (params and optimizer state kept)
and counted; fp16 uses dynamic loss scaling. The step's dropout rng is fold_in(state.rng, step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dret.losses import contrastive_loss, matryoshka_loss
from dret.model import finish, pool
from dret.models.logical import activation_rules
from dret.peft import with_lora_rng
from dret.sharding import ActivationConstraint

LOSS_SCALE_GROWTH_INTERVAL = 1000  # fp16: double the loss scale after this many finite steps in a row


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken
    params: Any  # nnx.State of the trainable variables
    frozen: Any  # nnx.State of the frozen weights
    opt_state: Any
    rng: jax.Array  # uint32 [2], base key; the step's key is fold_in(rng, step)
    loss_scale: jax.Array  # float32 [], 1 unless fp16
    finite_run: jax.Array  # int32 [], finite steps in a row (fp16 scale growth)
    nonfinite_run: jax.Array  # int32 [], skipped steps in a row (the trainer aborts past a limit)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings the step closes over (hashable, so the jitted step compiles once)."""

    graphdef: Any
    tx: Any
    pooling: str
    normalized: bool
    group_size: int
    temperature: float
    margin: float
    use_inbatch_neg: bool
    matryoshka: tuple[tuple[int, float], ...]  # ((dim, weight), ...) or () when off
    accumulation: int
    loss_shards: int  # 1 = negatives from the global batch; n = each data shard scores its own passages
    fp16: bool
    grad_shardings: tuple | None = None  # stage2/3: the gradients' flat shardings (dret.sharding.grad_shardings)
    opt_device_shardings: tuple | None = None  # offload: the host-resident optimizer state's flat device shardings
    mesh: Any = None  # activations are kept batch-sharded on this mesh (None: no constraints)


def _embed(model, ids_bt, mask_bt, rng, cfg: StepConfig):
    v_bd = pool(model(ids_bt, mask_bt, dropout_rng=rng), mask_bt, cfg.pooling)
    return finish(v_bd, normalize=cfg.normalized, dim=None)


def _loss(q_bd, p_nd, cfg: StepConfig):
    kwargs = dict(group_size=cfg.group_size, temperature=cfg.temperature, margin=cfg.margin,
                  use_inbatch_neg=cfg.use_inbatch_neg)
    if cfg.matryoshka:
        dims, weights = zip(*cfg.matryoshka)
        fn = functools.partial(matryoshka_loss, dims=dims, weights=weights, **kwargs)
    else:
        fn = functools.partial(contrastive_loss, **kwargs)
    if cfg.loss_shards == 1:
        return fn(q_bd, p_nd)
    # Without cross-device negatives each data shard scores its queries against its own passages only.
    s = cfg.loss_shards
    losses, metrics = jax.vmap(fn)(q_bd.reshape(s, -1, q_bd.shape[-1]), p_nd.reshape(s, -1, p_nd.shape[-1]))
    return losses.mean(), jax.tree.map(jnp.mean, metrics)


def _micro_loss(params, frozen, batch, rng, cfg: StepConfig):
    model = with_lora_rng(nnx.merge(cfg.graphdef, params, frozen), jax.random.fold_in(rng, 1))
    q_bd = _embed(model, batch["query_ids"], batch["query_mask"], jax.random.fold_in(rng, 2), cfg)
    p_nd = _embed(model, batch["passage_ids"], batch["passage_mask"], jax.random.fold_in(rng, 3), cfg)
    return _loss(q_bd, p_nd, cfg)


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] queries and [B*G, ...] passages -> [n, B/n, ...] and [n, B*G/n, ...].

    Micro-batch a takes queries a, a+n, a+2n, ... so each keeps the batch's split over devices.
    """
    b = batch["query_ids"].shape[0]

    def split(x):
        per_query = x.shape[0] // b
        x = x.reshape(b // n, n, per_query, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0).reshape(n, (b // n) * per_query, *x.shape[3:])

    return jax.tree.map(split, batch)


def _place(tree, shardings: tuple | None, put=jax.lax.with_sharding_constraint):
    """`put(leaf, sharding)` for each leaf of `tree` and its flat `shardings` (None: `tree` as it is)."""
    if shardings is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [put(x, s) for x, s in zip(leaves, shardings, strict=True)])


def train_step(state: TrainState, batch: dict, cfg: StepConfig) -> tuple[TrainState, dict]:
    with activation_rules(None if cfg.mesh is None else ActivationConstraint(cfg.mesh)):
        return _train_step(state, batch, cfg)


def _train_step(state: TrainState, batch: dict, cfg: StepConfig) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    micro = split_micro_batches(batch, cfg.accumulation)

    def scaled_loss(params, micro_batch, micro_rng):
        loss, metrics = _micro_loss(params, state.frozen, micro_batch, micro_rng, cfg)
        return loss * state.loss_scale, (loss, metrics)

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def accumulate(grads_sum, xs):
        micro_batch, index = xs
        grads, aux = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        return _place(jax.tree.map(jnp.add, grads_sum, grads), cfg.grad_shardings), aux

    zeros = _place(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), cfg.grad_shardings)
    grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(cfg.accumulation)))
    grads = jax.tree.map(lambda g: g / (state.loss_scale * cfg.accumulation), grads)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(losses))
    opt_state = _place(state.opt_state, cfg.opt_device_shardings, jax.device_put)  # offload: host -> device
    updates, new_opt_state = cfg.tx.update(grads, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731

    loss_scale, finite_run = state.loss_scale, jnp.where(finite, state.finite_run + 1, 0)
    if cfg.fp16:
        grow = finite_run >= LOSS_SCALE_GROWTH_INTERVAL
        loss_scale = jnp.where(finite, jnp.where(grow, loss_scale * 2, loss_scale), loss_scale / 2)
        finite_run = jnp.where(grow, 0, finite_run)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt_state, opt_state),
        loss_scale=loss_scale, finite_run=finite_run,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
    out = {"loss": losses.mean(), "grad_norm": grad_norm, "param_norm": optax.tree.norm(new_state.params),
           "skipped": (~finite).astype(jnp.int32), "loss_scale": loss_scale,
           **jax.tree.map(jnp.mean, metrics)}
    return new_state, out
