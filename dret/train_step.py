"""The pure training step, (state, batch) -> (state, metrics), and what it closes over: precision, the optimizer,
the state's layout on the mesh, the static step settings. Jitted once, state donated.

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
from dret.models.logical import activation_rules
from dret.peft import with_lora_rng
from dret.pooling import finish, pool, text_positions
from dret.sharding import (OFFLOAD_MEMORY, ActivationConstraint, data_parallel_size, grad_shardings, opt_axes,
                           param_axes, parse_sharding, state_shardings)

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
    """The static settings the step closes over (hashable, so the jitted step compiles once); fields carry the
    config's names."""

    graphdef: Any
    tx: Any
    mesh: Any  # activations are kept batch-sharded on this mesh
    sentence_pooling_method: str
    normalized: bool
    train_group_size: int
    temperature: float
    margin: float
    use_inbatch_neg: bool
    matryoshka: tuple[tuple[int, float], ...]  # ((dim, weight), ...) or () when off
    gradient_accumulation_steps: int
    negatives_cross_device: bool  # False: each data shard scores its queries against its own passages only
    fp16: bool  # fp16 compute with dynamic loss scaling
    grad_shardings: tuple | None = None  # stage2/3: the gradients' flat shardings (dret.sharding.grad_shardings)
    opt_device_shardings: tuple | None = None  # offload: the host-resident optimizer state's flat device shardings


def precision(config) -> tuple:
    """(compute dtype, parameter dtype). Master weights stay float32 in every mode; fp16_opt_level O1 and O2 both
    compute matmuls in fp16 and keep norms, softmax and the loss in float32."""
    if config.bf16:
        return jnp.bfloat16, jnp.float32
    if config.fp16 and config.fp16_opt_level != "O0":
        return jnp.float16, jnp.float32
    return jnp.float32, jnp.float32


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
        graphdef=graphdef, tx=tx, mesh=mesh, sentence_pooling_method=config.sentence_pooling_method,
        normalized=config.normalized, train_group_size=config.train_group_size, temperature=config.temperature,
        margin=config.margin, use_inbatch_neg=config.use_inbatch_neg, matryoshka=matryoshka,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        negatives_cross_device=config.negatives_cross_device, fp16=precision(config)[0] == jnp.float16,
        grad_shardings=grad_shardings(mesh, params, stage),
        # offload: the step moves the optimizer state to the device and back
        opt_device_shardings=tuple(s.with_memory_kind(device_memory) for s in jax.tree.leaves(shardings.opt_state))
        if offload else None)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return step_config, jax.jit(train_step, static_argnums=2, donate_argnums=0, out_shardings=(shardings, replicated))


def embed(model, ids_bt, segments_bt, rng, cfg: StepConfig, pool_from_b=None):
    """Padded rows [B, T] (one text each, padding on either side; segments a 0/1 mask) -> vectors [B, d], with
    dropout keyed by `rng` (None: none); pool_from_b [B]: tokens left out of pooling (`dret.pooling.pool`)."""
    h_btd = model(ids_bt, segments_bt, positions_bt=text_positions(segments_bt), dropout_rng=rng)
    v_bd = pool(h_btd, segments_bt, cfg.sentence_pooling_method, pool_from_b)
    return finish(v_bd, normalize=cfg.normalized, dim=None)


def batch_loss(q_bd, p_nd, cfg: StepConfig):
    """(loss, metrics) of queries [B, d] and their groups' passages [B*G, d] (global batch), as the config asks:
    Matryoshka or not, negatives from the global batch or each data shard's own."""
    kwargs = dict(group_size=cfg.train_group_size, temperature=cfg.temperature, margin=cfg.margin,
                  use_inbatch_neg=cfg.use_inbatch_neg)
    if cfg.matryoshka:
        dims, weights = zip(*cfg.matryoshka)
        fn = functools.partial(matryoshka_loss, dims=dims, weights=weights, **kwargs)
    else:
        fn = functools.partial(contrastive_loss, **kwargs)
    if cfg.negatives_cross_device:
        return fn(q_bd, p_nd)
    s = data_parallel_size(cfg.mesh)
    losses, metrics = jax.vmap(fn)(q_bd.reshape(s, -1, q_bd.shape[-1]), p_nd.reshape(s, -1, p_nd.shape[-1]))
    return losses.mean(), jax.tree.map(jnp.mean, metrics)


def micro_batch_loss(params, frozen, batch, rng, cfg: StepConfig):
    """(loss, metrics) of one micro-batch, with dropout and LoRA dropout keyed by `rng`."""
    model = with_lora_rng(nnx.merge(cfg.graphdef, params, frozen), jax.random.fold_in(rng, 1))
    # dret.data's batches carry pool_from; batches built elsewhere (dret.plan's shapes, bench) may not
    q_bd = embed(model, batch["query_ids"], batch["query_mask"], jax.random.fold_in(rng, 2), cfg,
                 batch.get("query_pool_from"))
    p_nd = embed(model, batch["passage_ids"], batch["passage_mask"], jax.random.fold_in(rng, 3), cfg,
                 batch.get("passage_pool_from"))
    return batch_loss(q_bd, p_nd, cfg)


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


def place(tree, shardings: tuple | None, put=jax.lax.with_sharding_constraint):
    """`put(leaf, sharding)` for each leaf of `tree` and its flat `shardings` (None: `tree` as it is)."""
    if shardings is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [put(x, s) for x, s in zip(leaves, shardings, strict=True)])


def train_step(state: TrainState, batch: dict, cfg: StepConfig) -> tuple[TrainState, dict]:
    with activation_rules(ActivationConstraint(cfg.mesh)):
        return _train_step(state, batch, cfg)


def accumulated_grads(state: TrainState, batch: dict, cfg: StepConfig) -> tuple[Any, jax.Array, dict]:
    """(gradients averaged over the step's micro-batches, each micro-batch's loss [n], its metrics [n]).

    Micro-batch a (`split_micro_batches`) gets dropout key fold_in(fold_in(state.rng, state.step), a); its queries
    see only its own passages as negatives (all devices' under negatives_cross_device)."""
    rng = jax.random.fold_in(state.rng, state.step)
    micro = split_micro_batches(batch, cfg.gradient_accumulation_steps)

    def scaled_loss(params, micro_batch, micro_rng):
        loss, metrics = micro_batch_loss(params, state.frozen, micro_batch, micro_rng, cfg)
        return loss * state.loss_scale, (loss, metrics)

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def accumulate(grads_sum, xs):
        micro_batch, index = xs
        grads, aux = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        return place(jax.tree.map(jnp.add, grads_sum, grads), cfg.grad_shardings), aux

    zeros = place(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), cfg.grad_shardings)
    n_micro = cfg.gradient_accumulation_steps
    grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n_micro)))
    return jax.tree.map(lambda g: g / (state.loss_scale * n_micro), grads), losses, metrics


def _train_step(state: TrainState, batch: dict, cfg: StepConfig) -> tuple[TrainState, dict]:
    grads, losses, metrics = accumulated_grads(state, batch, cfg)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(losses))
    opt_state = place(state.opt_state, cfg.opt_device_shardings, jax.device_put)  # offload: host -> device
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
