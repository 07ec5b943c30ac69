"""`python -m dret.plan --config ml_configs/X.py --devices 8 --device_memory 80GiB [--backend gpu|tpu|cpu]`: will a
run fit?

For each stage, per-device bytes of the frozen and trainable parameters, optimizer state and gradients come from
`jax.eval_shape` and the shardings (arithmetic). `--backend gpu` (the default) or `tpu`: activations are modelled
from the model's shapes (`dret.plan_memory`: flash attention on GPU, `recompute` realised), each stage with recompute
off and on, peak = parameters + gradients + device optimizer state + activations; seconds, no compilation.
`--backend cpu`: the state is checked against XLA's compiled memory analysis on N fake CPU devices, and activations
are the compiled train step's temporaries less the gradients. No weights are read: the
model is built abstractly from config.json (the run's model folder, or --model_config). CPU compilation stands in
for the accelerator: fusion, layouts and attention differ there (XLA:CPU has no flash attention, and its schedule
does not realise `recompute`'s savings: a pure-JAX stack of checkpointed layers compiles to the same temporaries
with and without it), so treat activations as an upper bound. Models deeper than 4 layers are compiled at 2 and 4
layers and extrapolated linearly (`plan_layers`). XLA:CPU reports no host memory: under `offload` its peak counts the optimizer state,
which an accelerator keeps in pinned_host, as device memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

from absl import app, flags
from ml_collections import config_flags

from dret import models
from dret.config_check import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file of ml_configs/", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 1, "devices of the run (faked on the CPU)")
_MEMORY = flags.DEFINE_string("device_memory", "80GiB", "memory of one device, e.g. 80GiB, 141GB, 16GiB")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "queries per step; 0 = per_device_train_batch_size x data")
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "an HF config.json to plan from (default: the run's model)")
_BACKEND = flags.DEFINE_enum("backend", "gpu", ["gpu", "tpu", "cpu"],
                             "how activations are counted: gpu / tpu: modelled (dret.plan_memory), cpu: XLA:CPU's "
                             "compiled step")
flags.mark_flags_as_required(["config"])

log = logging.getLogger(__name__)
GiB = 2 ** 30
COMPILED_LAYERS = (2, 4)  # deeper models are compiled at these depths and extrapolated (`plan_layers`)
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": GiB,
         "TIB": 2 ** 40}


def count(n: int) -> str:
    """A parameter count for people: 6607343616 -> '6.61B', 79953920 -> '80.0M', 8704 -> '8704'."""
    for size, unit in ((1e9, "B"), (1e6, "M")):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


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


def parameter_counts(config, hf: dict) -> tuple[int, int]:
    """(frozen, trainable) parameter counts of the run's backbone (trainable: the LoRA adapters under lora)."""
    import jax

    _, params, frozen = abstract_model(config, hf)
    return tuple(sum(math.prod(x.shape) for x in jax.tree.leaves(s)) for s in (frozen, params))


def state_layout(config, hf: dict, mesh):
    """(graphdef, abstract trainable params, tx, abstract sharded TrainState, its shardings, per-device bytes of
    frozen / trainable parameters, optimizer state and float32 gradients) of the run's state on `mesh`: arithmetic
    on `jax.eval_shape`."""
    import jax
    import jax.numpy as jnp

    from dret.sharding import bytes_per_device, grad_shardings, parse_sharding
    from dret.train_step import make_optimizer
    from dret.train_step import state_layout as train_state_layout

    graphdef, params, frozen = abstract_model(config, hf)
    tx = make_optimizer(config, 1000)[0]
    init, shardings = train_state_layout(params, frozen, tx, mesh, config)
    state = jax.eval_shape(init, params, frozen)
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params)
    grad_layout = grad_shardings(mesh, params, parse_sharding(config.sharding)[0]) or shardings.params
    leaves, treedef = jax.tree.flatten(state)
    abstract_state = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                                  for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)])
    sizes = {"frozen": bytes_per_device(state.frozen, shardings.frozen),
             "trainable": bytes_per_device(state.params, shardings.params),
             "opt_state": bytes_per_device(state.opt_state, shardings.opt_state),
             "grads": bytes_per_device(grads, grad_layout)}
    return graphdef, params, tx, abstract_state, shardings, sizes


def plan_stage(config, hf: dict, mesh, global_batch: int) -> dict[str, int]:
    """Per-device bytes of one stage: arithmetic (eval_shape) and compiled figures; `host` is what XLA reports
    in host memory for the step (0 on XLA:CPU)."""
    import jax
    import jax.numpy as jnp

    from dret.sharding import BATCH
    from dret.train_step import make_step

    graphdef, params, tx, abstract_state, shardings, sizes = state_layout(config, hf, mesh)
    step_config, step_fn = make_step(config, graphdef, tx, mesh, params, shardings, hf["hidden_size"])
    g, n = global_batch, global_batch * config.train_group_size
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH))
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for name, shape in (
        ("query_ids", (g, config.query_max_len)), ("query_mask", (g, config.query_max_len)),
        ("passage_ids", (n, config.passage_max_len)), ("passage_mask", (n, config.passage_max_len)))}

    step = step_fn.lower(abstract_state, batch, step_config).compile().memory_analysis()
    params_compiled = jax.jit(lambda p, f: (p, f), out_shardings=(shardings.params, shardings.frozen)).lower(
        abstract_state.params, abstract_state.frozen).compile().memory_analysis()
    opt_compiled = jax.jit(tx.init, out_shardings=shardings.opt_state).lower(
        abstract_state.params).compile().memory_analysis()
    return {
        **sizes,
        "params_compiled": params_compiled.argument_size_in_bytes,
        "opt_state_compiled": opt_compiled.output_size_in_bytes + opt_compiled.host_output_size_in_bytes,
        "activations": max(step.temp_size_in_bytes - sizes["grads"], 0),
        "peak": step.argument_size_in_bytes + step.temp_size_in_bytes + step.output_size_in_bytes
        - step.alias_size_in_bytes,
        "host": step.host_argument_size_in_bytes + step.host_temp_size_in_bytes + step.host_output_size_in_bytes
        - step.host_alias_size_in_bytes,
    }


def with_layers(hf: dict, n: int) -> dict:
    """The HF config cut to its first n layers."""
    text = models.text_config(hf)
    return models.with_text_config(hf, {**text, "num_hidden_layers": n,
                                        **({"layer_types": text["layer_types"][:n]} if "layer_types" in text else {})})


def plan_layers(config, hf: dict, mesh, global_batch: int) -> dict[str, float]:
    """`plan_stage` of the whole model; past COMPILED_LAYERS[-1] layers, compiled at COMPILED_LAYERS and
    extrapolated linearly (every figure is a per-layer part times the layers plus a fixed part: embeddings,
    batch, one layer's temporaries), so a 32-layer plan costs two small compiles instead of one huge one."""
    layers = models.text_config(hf)["num_hidden_layers"]
    low, high = COMPILED_LAYERS
    if layers <= high:
        return plan_stage(config, hf, mesh, global_batch)
    b_low, b_high = (plan_stage(config, with_layers(hf, n), mesh, global_batch) for n in (low, high))
    return {k: b_low[k] + (b_high[k] - b_low[k]) * (layers - low) / (high - low) for k in b_low}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    logging.getLogger("dret").setLevel(logging.INFO)  # each stage's compile time, as it finishes
    from dret.errors import run_command

    run_command(lambda: print(plan(_CONFIG.value, _DEVICES.value, parse_bytes(_MEMORY.value), _GLOBAL_BATCH.value,
                                   _MODEL_CONFIG.value, _BACKEND.value)))


def modelled_activations(config, hf: dict, mesh, global_batch: int, backend: str, recompute: bool) -> int:
    """Per-device activation bytes of one micro-batch on a GPU or TPU (`dret.plan_memory`)."""
    from dret import plan_memory
    from dret.sharding import data_parallel_size, parse_sharding
    from dret.train_step import precision

    text = models.text_config(hf)
    family = models.family_of(text)
    dims = plan_memory.Dims.of(family.__name__.rsplit(".", 1)[-1], models.config_of(text))
    compute = precision(config)[0]
    tuning = plan_memory.Tuning(config.fine_tune_type, config.lora_rank, config.lora_dropout,
                                tuple(config.lora_target_modules) or family.LORA_TARGETS)
    micro = global_batch // config.gradient_accumulation_steps  # queries of one micro-batch, all devices
    rows = micro // data_parallel_size(mesh)
    loss_rows = micro if config.negatives_cross_device else rows
    return plan_memory.activation_bytes(
        dims, compute.dtype.itemsize, tuning, queries=(rows, config.query_max_len),
        passages=(rows * config.train_group_size, config.passage_max_len), loss_queries=rows,
        loss_passages=loss_rows * config.train_group_size, recompute=recompute,
        flash=backend == "gpu" and compute.dtype.itemsize == 2, gathered=parse_sharding(config.sharding)[0] == "stage3")


def modelled_rows(config, hf: dict, mesh, global_batch: int, device_memory: int, backend: str) -> list[str]:
    """The table of `plan --backend gpu|tpu`: each stage with recompute off and on."""
    from dret.sharding import STAGES, parse_sharding

    offload = parse_sharding(config.sharding)[1]
    lines = ["| stage | recompute | frozen | trainable | opt state (device) | grads | activations | peak | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        with config.unlocked():
            config.sharding = f"{stage}{' offload' if offload else ''}".strip()
        sizes = state_layout(config, hf, mesh)[-1]
        device_opt = 0 if offload else sizes["opt_state"]
        for recompute in (False, True):
            act = modelled_activations(config, hf, mesh, global_batch, backend, recompute)
            # offload: the optimizer state comes to the device for the update, once the backward has freed the
            # activations
            peak = (sizes["frozen"] + sizes["trainable"] + sizes["grads"]
                    + max(act + device_opt, sizes["opt_state"] if offload else 0))
            gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
            lines.append(f"| {stage or 'none'}{' offload' if offload else ''} | {'on' if recompute else 'off'} | {gib(sizes['frozen'])} | "
                         f"{gib(sizes['trainable'])} | {gib(device_opt)} | {gib(sizes['grads'])} | {gib(act)} | "
                         f"{gib(peak)} | {'yes' if peak <= device_memory else 'no'} |")
    return lines


def plan(config, devices: int, device_memory: int, global_batch: int = 0, model_config: str = "",
         backend: str = "gpu") -> str:
    """The plan as a markdown table: per stage, activations modelled for a GPU or TPU (with recompute off and on),
    or compiled by XLA:CPU (`backend` cpu)."""
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
    frozen, trainable = parameter_counts(config, hf)
    layers = models.text_config(hf)["num_hidden_layers"]
    tuned = f"lora r{config.lora_rank}" if config.fine_tune_type == "lora" else config.fine_tune_type
    lines = [f"{devices} devices, mesh {dict(mesh.shape)}, global batch {global_batch} x group "
             f"{config.train_group_size} ({config.gradient_accumulation_steps} micro-batches), query "
             f"{config.query_max_len} / passage {config.passage_max_len}, {tuned}: {count(frozen)} frozen + "
             f"{count(trainable)} trainable parameters, {'bf16' if config.bf16 else 'fp16' if config.fp16 else 'fp32'}"
             f", device memory {device_memory / GiB:.1f} GiB (GiB per device; "]
    if backend != "cpu":
        attention = "cuDNN flash" if backend == "gpu" and (config.bf16 or config.fp16) else "XLA"
        lines[0] += (f"activations modelled for {backend} (dret.plan_memory), {attention} attention; the config has "
                     f"recompute {'on' if config.recompute else 'off'})")
        return "\n".join(lines + [""] + modelled_rows(config, hf, mesh, global_batch, device_memory, backend))
    lines[0] += ("compiled figures from XLA on CPU" + (f", at {' and '.join(map(str, COMPILED_LAYERS))} layers, "
                                                       f"extrapolated to {layers}" if layers > COMPILED_LAYERS[-1]
                                                       else "") + ")")
    lines += ["", "| stage | frozen | trainable | (compiled, both) | opt state | (compiled) | grads | activations "
             "| peak (compiled step) | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    host = 0
    for stage in STAGES:
        with config.unlocked():
            config.sharding = f"{stage}{offload}".strip()
        start = time.perf_counter()
        b = plan_layers(config, hf, mesh, global_batch)
        log.info("%s planned in %.0f s", config.sharding or "no sharding", time.perf_counter() - start)
        host = max(host, b["host"])
        gib = {k: f"{v / GiB:.2f}" for k, v in b.items()}
        lines.append(f"| {stage or 'none'}{offload} | {gib['frozen']} | {gib['trainable']} | "
                     f"{gib['params_compiled']} | {gib['opt_state']} | {gib['opt_state_compiled']} | {gib['grads']} | "
                     f"{gib['activations']} | {gib['peak']} | {'yes' if b['peak'] <= device_memory else 'no'} |")
    if offload:
        lines += ["", f"offload: the optimizer state lives in pinned_host; XLA reported {host / GiB:.2f} GiB of host "
                  "memory for the step" + (", so the peak counts the optimizer state as device memory (at most the "
                                           "opt state column too high)" if not host else " (not in the peak)")]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
