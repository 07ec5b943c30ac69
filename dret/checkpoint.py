"""Orbax checkpoints of the train state plus a JSON side-car (data position, config), async, keep-N."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """`output_dir/checkpoints/<step>/{state, meta}`; a checkpoint is visible only once fully written."""

    def __init__(self, directory: str, *, max_to_keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an async save; the next save (or `close`) waits for it."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """State onto the shardings of `abstract_state` (ShapeDtypeStructs; any mesh), and the meta dict."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_raw(self, step: int) -> dict:
        """The saved state as nested dicts of arrays, without a target structure (for export)."""
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract(tree):
    """Arrays -> ShapeDtypeStructs with their shardings (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
