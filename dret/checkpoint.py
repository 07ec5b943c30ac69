"""Orbax checkpoints of the train state plus a JSON side-car (data position, config), async, keep-N."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys

import jax
import orbax.checkpoint as ocp

from dret.errors import DretError


class _OrbaxFailures(logging.Filter):
    """Orbax logs each failed background write with its traceback, from several threads; the Checkpointer
    reports the failure itself, as one line, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_FAILURES = _OrbaxFailures()


def _drop_closed_loop_callbacks(previous):
    """When a background save fails, tensorstore's callbacks for its writes still in flight reach the event loop
    that Orbax has closed, and Python prints each as an unraisable 'Event loop is closed' traceback (dozens, before
    the failure itself surfaces): drop those, and only those."""

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.dret = True
    return hook


def _cause(error: BaseException) -> str:
    """The reason a write failed, in a few words: 'No space left on device' rather than tensorstore's paragraph."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else " ".join(str(error).split())


class Checkpointer:
    """`output_dir/checkpoints/<step>/{state, meta}`; a checkpoint is visible only once fully written."""

    def __init__(self, directory: str, *, max_to_keep: int | None = None, writer: bool = True):
        """The training run saves (`writer`: removes what an interrupted save left, keeps `max_to_keep`); readers
        (evaluation, export) change nothing, so a checkpoint a running training is writing stays untouched."""
        self.directory = os.path.abspath(directory)
        logging.getLogger("absl").addFilter(_ORBAX_FAILURES)
        if not getattr(sys.unraisablehook, "dret", False):
            sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep if writer else None, create=writer,
                                                 enable_async_checkpointing=True, cleanup_tmp_directories=writer),
        )
        self._pending: int | None = None  # the step being written in the background
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _failure(self, error: Exception) -> DretError:
        """A failed (background) save as one line; its half-written folder is removed, earlier checkpoints stay."""
        self._failed = True
        self._remove_partial()
        # asyncio reports the failed save's orphaned write tasks at exit, with tracebacks: the cause is said below
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        latest = self._manager.latest_step()
        return DretError(f"saving checkpoint {self._pending} in {self.directory} failed: {_cause(error)}; "
                         f"the latest complete checkpoint is {latest if latest is not None else 'none'}")

    def _remove_partial(self) -> None:
        for partial in glob.glob(os.path.join(self.directory, f"{self._pending}.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an async save; the next save (or `close`) waits for it and reports its failure."""
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # the previous save's background failure surfaces here (orbax wraps any error)
            raise self._failure(e) from e
        self._pending = step

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """State onto the shardings of `abstract_state` (ShapeDtypeStructs; any mesh; `ocp.PLACEHOLDER` leaves are
        not read), and the meta dict."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state, restore_args), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        """Waits for the last save; its failure is raised unless one was already reported."""
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception as e:
            if not self._failed:
                raise self._failure(e) from e
        finally:
            if self._failed:  # writes still in flight when the failure surfaced may have added files since
                self._remove_partial()


def abstract(tree):
    """Arrays -> ShapeDtypeStructs with their shardings (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
