"""A training run's output_dir: which folder may hold a run, the lock that keeps one run per folder, and
overwrite_output_dir, which deletes only what dret wrote there."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile

from dret import __version__
from dret.errors import DretError

log = logging.getLogger(__name__)
RUN_MARKER = "dret_run.json"  # written when a run first claims the folder: what makes a folder a dret run
LOCK = ".dret.lock"  # {"host", "pid"} of the run using the folder
# everything dret writes there ("data": the built-in training data, written for runs that use it)
OUTPUTS = ("checkpoints", "export", "export.new", "metrics.jsonl", "tensorboard", "data", RUN_MARKER)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """An exclusive lock file in output_dir; a stale one (its process gone, on this host) is taken over."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid()}

    def _read_holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError, AttributeError):
            return None

    def acquire(self) -> RunLock:
        # The holder is written to a temporary file first and linked into place: the lock is never seen half-written.
        fd, staged = tempfile.mkstemp(prefix=".dret.lock.", dir=os.path.dirname(self.path))
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
        try:
            for _ in range(2):
                try:
                    os.link(staged, self.path)
                    return self
                except FileExistsError:
                    holder = self._read_holder()
                    if holder is None or holder["host"] != self.holder["host"] or _is_alive(holder["pid"]):
                        who = f"pid {holder['pid']} on {holder['host']}" if holder else "an unreadable lock"
                        raise DretError(f"{os.path.dirname(self.path)} is in use by another run ({who}): wait for it "
                                        f"to finish, or delete {self.path} if that run is gone") from None
                    log.warning("taking over the stale lock %s of pid %d, which is no longer running",
                                self.path, holder["pid"])
                    os.remove(self.path)
            raise DretError(f"could not take the lock {self.path}: another run keeps taking it")
        finally:
            os.remove(staged)

    def release(self) -> None:
        if self._read_holder() == self.holder:
            os.remove(self.path)


def _protected(path: str) -> str | None:
    """Why `path` may never be cleared: the root, the home folder, the current folder or one of its parents."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep):
        return "the root folder"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "the home folder"
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([real, cwd]) == real:
        return "the current folder" if real == cwd else "a parent of the current folder"
    return None


def check(output_dir: str, overwrite: bool) -> set[str]:
    """Refuses, without writing anything, a folder that `claim` would refuse; returns the names it holds."""
    if not output_dir:
        raise DretError("output_dir is empty: set --config.output_dir=DIR")
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise DretError(f"output_dir {output_dir} is a symbolic link to nothing ({os.readlink(output_dir)})")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DretError(f"output_dir {output_dir} is a file, not a folder")
    reason = _protected(output_dir) if overwrite else None
    if reason:
        raise DretError(f"overwrite_output_dir refuses to clear output_dir {output_dir}: it is {reason}")
    entries = set(os.listdir(output_dir)) - {LOCK} if os.path.isdir(output_dir) else set()
    foreign = sorted(entries - set(OUTPUTS))
    if overwrite and foreign:
        raise DretError(f"overwrite_output_dir refuses to clear output_dir {output_dir}: it holds files dret did not "
                        f"write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another folder")
    if not overwrite and entries and RUN_MARKER not in entries:
        raise DretError(f"output_dir {output_dir} is not empty and holds no dret run: choose another folder "
                        "(overwrite_output_dir=True only deletes what dret wrote)")
    return entries


def claim(output_dir: str, overwrite: bool) -> RunLock:
    """Locks output_dir for this run: a new or empty folder, an earlier dret run to resume, or (with overwrite)
    one whose dret outputs are deleted first. Anything else is refused before a byte is written."""
    check(output_dir, overwrite)
    os.makedirs(output_dir, exist_ok=True)
    lock = RunLock(output_dir).acquire()
    try:
        for name in check(output_dir, overwrite) if overwrite else ():  # checked again, under the lock
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        marker = os.path.join(output_dir, RUN_MARKER)
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                json.dump({"written_by": "dret", "version": __version__}, f)
    except BaseException:
        lock.release()
        raise
    return lock
