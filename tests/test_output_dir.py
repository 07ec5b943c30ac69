"""output_dir: overwrite deletes only what dret wrote, one run per folder, foreign folders refused, and a full disk
ends a run with one line that leaves the earlier checkpoint / export intact."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dret import output_dir as run_folder
from dret.errors import DretError
from dret.trainer import train_and_evaluate
from tests.train_util import ROOT, tiny_config, train_command


@pytest.fixture
def no_deleting(monkeypatch):
    """A refusal must come before any deletion: make every deletion in output_dir.py fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"deleted {args}")
    monkeypatch.setattr(run_folder.shutil, "rmtree", refuse)
    monkeypatch.setattr(run_folder.os, "remove", refuse)


@pytest.mark.parametrize("where", ["root", "home", "cwd", "parent of cwd"])
def test_overwrite_refuses_protected_folders(where, tmp_path, monkeypatch, no_deleting):
    home, work = tmp_path / "home", tmp_path / "home" / "project" / "src"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"root": "/", "home": "~", "cwd": ".", "parent of cwd": ".."}[where]
    with pytest.raises(DretError, match="refuses to clear") as info:
        run_folder.claim(os.path.expanduser(target), overwrite=True)
    assert "\n" not in str(info.value)
    assert not os.path.exists(os.path.join(os.path.expanduser(target), run_folder.LOCK))


def test_overwrite_deletes_only_dret_outputs_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "run"
    run_folder.claim(str(out), overwrite=False).release()
    for name in ("checkpoints/2", "export", "tensorboard"):
        (out / name).mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    run_folder.claim(str(out), overwrite=True).release()
    assert sorted(os.listdir(out)) == [run_folder.RUN_MARKER]

    (out / "notes.txt").write_text("mine")
    (out / "checkpoints").mkdir()
    with pytest.raises(DretError, match="notes.txt"):
        run_folder.claim(str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints").is_dir()


def test_foreign_folder_with_checkpoints_is_not_taken_for_a_run(tmp_path):
    out = tmp_path / "theirs"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.pt").write_text("someone else's")
    with pytest.raises(DretError, match="holds no dret run"):
        train_and_evaluate(tiny_config(tmp_path, output_dir=str(out)))
    assert sorted(os.listdir(out)) == ["checkpoints"] and os.listdir(out / "checkpoints") == ["model.pt"]


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "empty"])
def test_unusable_output_dir_is_one_line(kind, tmp_path):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    elif kind == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DretError) as info:
        run_folder.claim("" if kind == "empty" else str(out), overwrite=True)
    assert {"file": "is a file", "dangling symlink": "link to nothing", "empty": "output_dir is empty"}[kind] \
        in str(info.value)


def test_symlink_to_a_folder_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run_folder.claim(str(tmp_path / "link"), overwrite=True).release()
    assert os.listdir(tmp_path / "real") == [run_folder.RUN_MARKER]


def test_second_run_on_a_locked_folder_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    lock = run_folder.claim(config.output_dir, overwrite=False)
    with pytest.raises(DretError, match=f"in use by another run \\(pid {os.getpid()} on "):
        train_and_evaluate(config)
    lock.release()
    assert not os.path.exists(os.path.join(config.output_dir, run_folder.LOCK))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    run_folder.claim(str(out), overwrite=False).release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": run_folder.socket.gethostname(), "pid": dead.pid}
    (out / run_folder.LOCK).write_text(json.dumps(holder))
    lock = run_folder.claim(str(out), overwrite=False)
    assert f"stale lock {out / run_folder.LOCK} of pid {dead.pid}" in caplog.text
    assert json.loads((out / run_folder.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def _run_on_small_disk(size: str, command: list[str], disk, listing) -> subprocess.CompletedProcess:
    """`command` with the folder `disk` on a tmpfs of `size`, in a private mount namespace (nothing outside sees
    it, so what is left on it is listed into the file `listing`, outside it, before it goes)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare (user and mount namespaces) to make a small disk")
    script = (f'mkdir -p "{disk}" && mount -t tmpfs -o size={size} tmpfs "{disk}" || exit 99; "$@"; rc=$?; '
              f'(cd "{disk}" && find . | sort) > "{listing}"; exit $rc')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    config = tiny_config(tmp_path, output_dir=str(tmp_path / "disk" / "run"), max_steps=2, save_steps=1)
    result = _run_on_small_disk("3m", train_command(config), tmp_path / "disk", tmp_path / "left.txt")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines[-1].startswith("dret: saving checkpoint 1 in "), lines[-5:]
    assert lines[-1].endswith("failed: No space left on device; the latest complete checkpoint is none"), lines[-1]
    left = (tmp_path / "left.txt").read_text().split()
    assert "./run/checkpoints" in left and not any(p.startswith("./run/checkpoints/") for p in left), left
    assert "./run/.dret.lock" not in left  # released on the way out


EXPORT_ON_FULL_DISK = """
import os, sys
from flax import nnx
from dret.errors import run_command
from dret.model import Embedder
from dret.models.bert import TINY
from dret.resources import bundled_minilm
from dret.hf_io import read_config
from dret import models
from dret.inference import publish
import transformers
hf = {**read_config(bundled_minilm()), **TINY}
embedder = Embedder(models.build(hf, rngs=nnx.Rngs(0)),
                    transformers.AutoTokenizer.from_pretrained(bundled_minilm()), hf, pooling="mean")
os.makedirs(sys.argv[1] + "/export")
open(sys.argv[1] + "/export/config.json", "w").write("previous")
run_command(publish, embedder, sys.argv[1] + "/export", "a model card")
"""


def test_disk_full_during_export_keeps_the_previous_export_and_no_temporary_folder(tmp_path):
    disk = tmp_path / "disk"
    result = _run_on_small_disk("2m", [sys.executable, "-c", EXPORT_ON_FULL_DISK, str(disk)], disk,
                                tmp_path / "left.txt")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dret: export to {disk}/export failed, the previous export is unchanged: "), line
    assert "No space left on device" in line
    assert (tmp_path / "left.txt").read_text().split() == [".", "./export", "./export/config.json"]
