"""Device mesh, the one logical-axis rules table, and the reference's `sharding` stages as shardings.

Model code names logical axes ('embed', 'mlp', ...); `RULES` maps each to mesh axes. Stages:
  ""      parameters, gradients and optimizer state replicated over data (tensor-sharded only)
  stage1  optimizer state sharded over ('data', 'fsdp')
  stage2  + gradients sharded the same way
  stage3  + parameters sharded over 'fsdp' (FSDP)
  offload optimizer state kept in host memory ('pinned_host'), with any stage
Stages split the 'embed' axis: variables without one (layer norms, biases of 'heads' / 'mlp') stay
replicated over ('data', 'fsdp'), as does any axis that does not divide evenly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dret.errors import DretError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes
STAGES = ("", "stage1", "stage2", "stage3")
OFFLOAD_MEMORY = "pinned_host"

# logical axis -> mesh axis for parameters that are not FSDP-sharded; 'embed' is the FSDP axis.
RULES = {
    "vocab": "tensor", "heads": "tensor", "mlp": "tensor", "embed": None,
    "position": None, "token_type": None, "norm": None,
}


def parse_sharding(flag: str) -> tuple[str, bool]:
    """'stage3 offload' -> ('stage3', True)."""
    words = flag.split()
    offload = "offload" in words
    stages = [w for w in words if w != "offload"]
    if len(stages) > 1 or (stages and stages[0] not in STAGES):
        raise DretError(f"sharding={flag!r}: expected one of stage1, stage2, stage3, optionally followed by offload")
    return (stages[0] if stages else ""), offload


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> jax.sharding.Mesh:
    """Mesh ('data', 'fsdp', 'tensor'); one size may be -1 (= the remaining devices)."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or len(devices) % known:
        raise DretError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise DretError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {np.prod(sizes)} of {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: tuple, *, fsdp_axes) -> P:
    """Logical names of one variable -> PartitionSpec; 'embed' goes to `fsdp_axes` (None = replicated)."""
    spec = []
    for name in names:
        if name is None:
            spec.append(None)
        elif name == "embed":
            spec.append(fsdp_axes)
        elif name in RULES:
            spec.append(RULES[name])
        else:
            raise DretError(f"logical axis {name!r} has no sharding rule (known: {', '.join(RULES)})")
    return P(*spec)


def _variable_names(variable) -> tuple:
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        return (None,) * len(variable.shape)
    return tuple(names)


def state_shardings(mesh, abstract_state, *, fsdp_axes):
    """NamedSharding for each variable of an abstract nnx.State, from its logical axis names."""
    from flax import nnx

    def one(variable):
        if not isinstance(variable, nnx.Variable) or not len(variable.shape):
            return NamedSharding(mesh, P())
        if isinstance(variable, nnx.RngState):
            return NamedSharding(mesh, P())
        names = _variable_names(variable)
        spec = logical_to_spec(names, fsdp_axes=fsdp_axes)
        # An axis too small to split evenly stays replicated.
        spec = P(*[a if a is None or variable.shape[i] % _axis_size(mesh, a) == 0 else None
                   for i, a in enumerate(spec)])
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_axes(stage: str):
    """Mesh axes of the parameters' 'embed' dimension: 'fsdp' under stage3, else replicated."""
    return "fsdp" if stage == "stage3" else None


def opt_axes(stage: str):
    """Mesh axes of the optimizer state's (and stage2/3 gradients') 'embed' dimension."""
    return BATCH if stage else None


def grad_shardings(mesh, params, stage: str) -> tuple | None:
    """Stage2/3: the gradients' shardings (flat, in leaf order; laid out like the optimizer moments).

    None leaves the layout to XLA (replicated like the parameters under stage1 and below).
    """
    if stage not in ("stage2", "stage3"):
        return None
    return tuple(jax.tree.leaves(state_shardings(mesh, params, fsdp_axes=opt_axes(stage))))


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
    shapes = jax.tree.leaves(tree)
    return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(shapes, jax.tree.leaves(shardings), strict=True))


def _axis_size(mesh, axes) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


# logical axis -> mesh axes for activations: batch over the data-parallel axes, features whole.
ACTIVATION_RULES = {"batch": BATCH, "length": None, "embed": None}


@dataclasses.dataclass(frozen=True)
class ActivationConstraint:
    """Rules for `dret.models.logical.activation_rules`: keeps activations batch-sharded, so FSDP (stage3)
    parameters are gathered instead of activations being re-laid out along 'embed'."""

    mesh: Any

    def __call__(self, x, names):
        spec = P(*[ACTIVATION_RULES[n] for n in names])
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    @property
    def batch_shards(self) -> int:
        return data_parallel_size(self.mesh)

    def per_batch_shard(self, fn):
        """`fn(*xs)` on each device's rows of batch-sharded [B, ...] arrays. `fn` is per-example, so its outputs
        vary by shard as its inputs do; vma checks are off because a custom_vjp's cotangents do not carry them."""
        return jax.shard_map(fn, mesh=self.mesh, in_specs=P(BATCH), out_specs=P(BATCH), check_vma=False)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH))


def data_parallel_size(mesh) -> int:
    return _axis_size(mesh, BATCH)
