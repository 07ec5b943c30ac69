"""`python -m dret.plan --config ml_configs/X.py --devices 8 --device_memory 80GiB`: will a run fit?

For each stage, per-device bytes of parameters, optimizer state and gradients come from
`jax.eval_shape` and the shardings (arithmetic), and are checked against XLA's compiled memory
analysis on N fake CPU devices; activations are the compiled train step's temporaries less the
gradients. No weights are read: the model is built abstractly from config.json (the run's model
folder, or --model_config). CPU compilation stands in for the accelerator: fusion and layouts differ
there, so treat activations as an estimate.
"""

from __future__ import annotations

import json
import os
import re

from absl import app, flags
from ml_collections import config_flags

from dret.config_check import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file of ml_configs/", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 1, "devices of the run (faked on the CPU)")
_MEMORY = flags.DEFINE_string("device_memory", "80GiB", "memory of one device, e.g. 80GiB, 141GB, 16GiB")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "queries per step; 0 = per_device_train_batch_size x data")
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "an HF config.json to plan from (default: the run's model)")
flags.mark_flags_as_required(["config"])

GiB = 2 ** 30
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": GiB,
         "TIB": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920."""
    from dret.errors import DretError

    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise DretError(f"device_memory={text!r}: expected a size such as 80GiB or 141GB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def abstract_model(config, hf: dict):
    """(graphdef, params, frozen) of the run's backbone as ShapeDtypeStruct-valued states (no weights)."""
    from flax import nnx

    from dret import models, peft
    from dret.train_step import precision

    dtype, param_dtype = precision(config)

    def make():
        model = models.build(hf, dtype=dtype, param_dtype=param_dtype, remat=config.recompute,
                             rngs=nnx.Rngs(config.seed))
        return peft.split_trainable(model, hf, config)

    return nnx.eval_shape(make)


def plan_stage(config, hf: dict, mesh, global_batch: int) -> dict[str, int]:
    """Per-device bytes of one stage: arithmetic (eval_shape) and compiled figures."""
    import jax
    import jax.numpy as jnp

    from dret.sharding import BATCH, bytes_per_device, grad_shardings, parse_sharding
    from dret.train_step import make_optimizer, make_step, state_layout

    graphdef, params, frozen = abstract_model(config, hf)
    tx = make_optimizer(config, 1000)[0]
    init, shardings = state_layout(params, frozen, tx, mesh, config)
    state = jax.eval_shape(init, params, frozen)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, hf["hidden_size"])
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params)
    grad_layout = grad_shardings(mesh, params, parse_sharding(config.sharding)[0]) or shardings.params

    g, n = global_batch, global_batch * config.train_group_size
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH))
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for name, shape in (
        ("query_ids", (g, config.query_max_len)), ("query_mask", (g, config.query_max_len)),
        ("passage_ids", (n, config.passage_max_len)), ("passage_mask", (n, config.passage_max_len)))}
    leaves, treedef = jax.tree.flatten(state)
    abstract_state = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                                  for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)])

    step = step_fn.lower(abstract_state, batch, step_config).compile().memory_analysis()
    params_compiled = jax.jit(lambda p: p, out_shardings=shardings.params).lower(
        abstract_state.params).compile().memory_analysis()
    opt_compiled = jax.jit(tx.init, out_shardings=shardings.opt_state).lower(
        abstract_state.params).compile().memory_analysis()
    grads_bytes = bytes_per_device(grads, grad_layout)
    return {
        "params": bytes_per_device(state.params, shardings.params) + bytes_per_device(state.frozen, shardings.frozen),
        "params_compiled": params_compiled.argument_size_in_bytes + bytes_per_device(state.frozen, shardings.frozen),
        "opt_state": bytes_per_device(state.opt_state, shardings.opt_state),
        "opt_state_compiled": opt_compiled.output_size_in_bytes,
        "grads": grads_bytes,
        "activations": max(step.temp_size_in_bytes - grads_bytes, 0),
        "peak": step.argument_size_in_bytes + step.temp_size_in_bytes + step.output_size_in_bytes
        - step.alias_size_in_bytes,
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from dret.errors import run_command

    run_command(lambda: print(plan(_CONFIG.value, _DEVICES.value, parse_bytes(_MEMORY.value), _GLOBAL_BATCH.value,
                                   _MODEL_CONFIG.value)))


def plan(config, devices: int, device_memory: int, global_batch: int = 0, model_config: str = "") -> str:
    """The plan as a markdown table (one row per stage)."""
    import jax

    from dret.resources import resolve_model
    from dret.sharding import STAGES, data_parallel_size, make_mesh

    if jax.device_count() < devices:
        from dret.errors import DretError
        raise DretError(f"{devices} devices asked, {jax.device_count()} available: run dret.plan in a fresh process")
    hf = json.load(open(model_config)) if model_config else resolve_model(config).hf
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=jax.devices()[:devices])
    dp = data_parallel_size(mesh)
    global_batch = global_batch or config.per_device_train_batch_size * dp * config.gradient_accumulation_steps
    offload = " offload" if "offload" in config.sharding else ""
    lines = [f"{devices} devices, mesh {dict(mesh.shape)}, global batch {global_batch} x group "
             f"{config.train_group_size}, passage {config.passage_max_len}, {config.fine_tune_type}, "
             f"{'bf16' if config.bf16 else 'fp16' if config.fp16 else 'fp32'}, device memory "
             f"{device_memory / GiB:.1f} GiB (GiB per device; compiled figures from XLA on CPU)", "",
             "| stage | params | (compiled) | opt state | (compiled) | grads | activations | peak (compiled step) | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        with config.unlocked():
            config.sharding = f"{stage}{offload}".strip()
        b = plan_stage(config, hf, mesh, global_batch)
        gib = {k: f"{v / GiB:.2f}" for k, v in b.items()}
        lines.append(f"| {stage or 'none'}{offload} | {gib['params']} | {gib['params_compiled']} | {gib['opt_state']} | "
                     f"{gib['opt_state_compiled']} | {gib['grads']} | {gib['activations']} | {gib['peak']} | "
                     f"{'yes' if b['peak'] <= device_memory else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
