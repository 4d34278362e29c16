"""Faults never cost work (issue 30): a save killed at any file operation, a rerun over an interrupted run's
checkpoints, two runs into one output folder.

Unit tests of the helpers (no training run): `export.FAULT_HOOK` fails one file operation of `atomic_dir` at a
time, either as an exception (SIGTERM, Ctrl-C, a failed rename: the exception path still runs) or as a kill
(that operation and every later one fail, so nothing after it happens, as after SIGKILL).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dschat.models import export

NEW = {"config.json": "new", "model.safetensors": "new", export.DONE_MARKER: "new"}
OLD = {"config.json": "old", "model.safetensors": "old", "model-00002-of-00002.safetensors": "old",
       "adapter_config.json": "old", export.DONE_MARKER: "old"}
USER = {"notes.json": "mine", "training.log": "old log\n", "checkpoints/latest": "step5",
        "checkpoints/step5/state.json": "{}", "runs/events.out": "tb", **{f"many/{i}.txt": str(i) for i in range(3)},
        **{f"file{i}.txt": str(i) for i in range(4)}}


class Killed(BaseException):
    """The injected fault (a BaseException, as Ctrl-C and SIGTERM's Terminated are)."""


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_of(out: Path) -> str:
    """'old' or 'new' when `out` holds exactly that model, whole (no file of the other one); else what is there."""
    files = {k: v for k, v in tree(out).items() if export.is_model_file(k) and k != export.SAVE_MARKER} \
        if out.is_dir() else {}
    for name, expected in (("old", OLD), ("new", NEW)):
        if files == expected:
            return name
    return f"mixed {files}"


def user_files_anywhere(out: Path) -> dict[str, str]:
    """The user's files in `out` or in one of its hidden siblings (where an interrupted save may park them)."""
    found: dict[str, str] = {}
    for folder in [out, *out.parent.glob(f".{out.name}.*")]:
        if folder.is_dir():
            found.update({k: v for k, v in tree(folder).items() if k in USER})
    return found


def save(out: Path, files: dict[str, str]) -> None:
    with export.atomic_dir(str(out)) as tmp:
        write(tmp, files)


def count_ops(out: Path, monkeypatch) -> list[str]:
    ops: list[str] = []
    monkeypatch.setattr(export, "FAULT_HOOK", ops.append)
    save(out, NEW)
    monkeypatch.setattr(export, "FAULT_HOOK", None)
    return ops


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
@pytest.mark.parametrize("mode", ["exception", "kill"])
def test_a_save_failed_at_any_file_operation_loses_nothing(tmp_path, monkeypatch, exchange, mode):
    if not exchange:
        monkeypatch.setattr(export, "_exchange", lambda a, b: False)
    probe = tmp_path / "probe" / "model"
    probe.mkdir(parents=True)
    write(probe, {**OLD, **USER})
    ops = count_ops(probe, monkeypatch)
    assert sum(op.startswith("rename ") for op in ops) >= 6 and any(op.startswith("swap") for op in ops)
    for n in range(len(ops)):
        out = tmp_path / f"case{n}" / "model"
        out.mkdir(parents=True)
        write(out, {**OLD, **USER})
        seen: list[str] = []

        def fault(what: str, n: int = n, seen: list[str] = seen) -> None:
            seen.append(what)
            if len(seen) == n + 1 or (mode == "kill" and len(seen) > n):
                raise Killed(what)

        monkeypatch.setattr(export, "FAULT_HOOK", fault)
        with pytest.raises(Killed):
            save(out, NEW)
        monkeypatch.setattr(export, "FAULT_HOOK", None)
        where = f"{mode} at operation {n + 1} ({ops[n]})"
        if out.exists() or mode == "exception":
            assert model_of(out) in ("old", "new"), where
        if mode == "exception":  # the exception path finished the job: nothing is left beside the output
            assert {k: v for k, v in tree(out).items() if k in USER} == USER, where
            assert list(out.parent.glob(".model.*")) == [], where
        else:
            assert user_files_anywhere(out) == USER, where
        # The next save (its process is another: the dead one's folders are stale) loses nothing.
        monkeypatch.setattr(export, "_owner_alive", lambda p: False)
        out.mkdir(exist_ok=True)  # the rerun's script opens its log there before main.py starts
        (out / "training.log").exists() or (out / "training.log").write_text("rerun log\n")
        save(out, NEW)
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(export, "_exchange", lambda a, b: False)
        got = tree(out)
        assert model_of(out) == "new", where
        assert list(out.parent.glob(".model.*")) == [], where
        for name, text in USER.items():
            assert got.get(name) == text or (name == "training.log" and got.get(name + ".recovered") == text), where


def test_recovery_puts_parked_files_back_before_removing_the_folder(tmp_path):
    """The state a SIGKILL in the middle of the carry-over leaves: the new model in place, the old folder with
    the rest of the user's files beside it; `recover` moves them back (a name taken since: `.recovered`)."""
    out = tmp_path / "model"
    out.mkdir()
    write(out, {**NEW, "notes.json": "mine", "training.log": "rerun log\n"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parked = tmp_path / f".model.tmp-{dead.pid}-abc"
    parked.mkdir()
    write(parked, {**OLD, "training.log": "old log\n", "checkpoints/latest": "step5", "more.txt": "x"})
    pending = tmp_path / f".model.tmp-{dead.pid}-def"  # a new model that never took the output's place
    pending.mkdir()
    write(pending, {**NEW, export.SAVE_MARKER: ""})
    assert export.recover(out) == [parked, pending]
    assert tree(out) == {**NEW, "notes.json": "mine", "training.log": "rerun log\n",
                         "training.log.recovered": "old log\n", "checkpoints/latest": "step5", "more.txt": "x"}
    assert not parked.exists() and not pending.exists()
    assert os.listdir(tmp_path) == ["model"]
