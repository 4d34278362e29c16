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
import time
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


def all_versions(out: Path) -> set[tuple[str, str]]:
    """(name, text) of every file in `out` and its hidden siblings, `.recovered` copies under their own name."""
    found = set()
    for folder in [out, *out.parent.glob(f".{out.name}.*")]:
        if folder.is_dir():
            found |= {(k.split(".recovered")[0], v) for k, v in tree(folder).items()}
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
        if mode == "kill":  # reruns killed in their turn (during the recovery, too) lose nothing either
            for m in range(1, 6):
                def fault_again(what: str, m: int = m, seen: list[str] = []) -> None:  # noqa: B006
                    seen.append(what)
                    if len(seen) >= m:
                        raise Killed(what)

                monkeypatch.setattr(export, "FAULT_HOOK", fault_again)
                with pytest.raises(Killed):
                    save(out, NEW)
                monkeypatch.setattr(export, "FAULT_HOOK", None)
                assert not out.exists() or model_of(out) in ("old", "new"), (where, m)
                assert set(USER.items()) <= all_versions(out), (where, m)
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


# ---------------------------------------------------------------- a rerun over an interrupted run's checkpoints

def test_a_rerun_over_checkpoints_needs_resume_or_overwrite_checkpoints(tmp_path):
    import argparse

    from dschat.cli.args import add_run_args, check_earlier_checkpoints
    from dschat.runtime.errors import FlagError

    p = argparse.ArgumentParser()
    add_run_args(p, tb_default="tb")
    out = tmp_path / "out"
    args = p.parse_args(["--output_dir", str(out)])
    check_earlier_checkpoints(args)  # no folder yet
    write(out, {"checkpoints/step65/state.json": "{}", "checkpoints/latest": "step65", "notes.json": "mine"})
    with pytest.raises(FlagError) as err:
        check_earlier_checkpoints(args)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "step65" in message
    assert "--resume" in message and "--overwrite_checkpoints" in message
    check_earlier_checkpoints(p.parse_args(["--output_dir", str(out), "--resume"]))
    args.print_examples = 2  # shows data, writes nothing
    check_earlier_checkpoints(args)
    check_earlier_checkpoints(p.parse_args(["--output_dir", str(out), "--overwrite_checkpoints"]))
    with pytest.raises(FlagError, match="give one"):
        check_earlier_checkpoints(p.parse_args(["--output_dir", str(out), "--resume", "--overwrite_checkpoints"]))
    assert tree(out) == {"checkpoints/latest": "step65", "checkpoints/step65/state.json": "{}", "notes.json": "mine"}

    from dschat.cli.outdir import claim_output_dir

    with claim_output_dir(p.parse_args(["--output_dir", str(out), "--resume"])):
        assert (out / "checkpoints" / "latest").exists()  # kept for the resume
    with claim_output_dir(p.parse_args(["--output_dir", str(out), "--overwrite_checkpoints"])):
        assert tree(out) == {"notes.json": "mine"}  # deleted as asked, nothing else


# ---------------------------------------------------------------- two runs into one output folder

def test_a_live_owner_refuses_a_second_run_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    import fcntl
    import json
    import socket

    from dschat.runtime import lock
    from dschat.runtime.errors import FlagError

    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    path = lock.lock_path(out)
    assert path == tmp_path / ".out.dschat-lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        with lock.output_lock(str(out)) as held:  # this run holds it: a second run is refused, naming the pid
            assert held == path and json.loads(path.read_text())["pid"] == os.getpid()
            with pytest.raises(FlagError) as err:
                lock.acquire(str(out))
            assert f"--output_dir {out} is in use by another run (pid {os.getpid()}" in str(err.value)
        assert not path.exists()  # released at the end of the run

        # A live process on this host named in the file (no flock: e.g. a filesystem without it) also refuses.
        path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                    "start": lock.process_start(live.pid)}))
        with pytest.raises(FlagError, match=f"pid {live.pid} on"):
            lock.acquire(str(out))
        # A lock held (flock) by another open of the file, as another process would: refused.
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(FlagError, match=f"pid {live.pid}"):
                lock.acquire(str(out))
        finally:
            os.close(fd)

        # The lock of a process that is gone (same host) is taken over, and said so in one line.
        path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "1"}))
        capsys.readouterr()
        with pytest.raises(RuntimeError):  # released on errors too (and on SIGTERM, which the steps raise)
            with lock.output_lock(str(out)):
                assert json.loads(path.read_text())["pid"] == os.getpid()
                raise RuntimeError("boom")
        note = [line for line in capsys.readouterr().out.splitlines() if "took over" in line]
        assert len(note) == 1 and f"pid {dead.pid}" in note[0] and str(out) in note[0]
        assert not path.exists()
        # A pid reused by another process (another start time) is not the owner either.
        path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "start": "1"}))
        lock.release(str(out), lock.acquire(str(out)))
        # A killed owner that nobody reaped yet (a zombie: its parent died first, as e2e's trainer after kill -9)
        # holds nothing: its lock is taken over.
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        wait_until = time.time() + 30
        while lock._stat_fields(zombie.pid)[0] != "Z" and time.time() < wait_until:
            time.sleep(0.05)  # exited, not waited for
        path.write_text(json.dumps({"pid": zombie.pid, "host": socket.gethostname(),
                                    "start": lock.process_start(zombie.pid)}))
        assert lock.holder(out) is None
        lock.release(str(out), lock.acquire(str(out)))
        zombie.wait()
    finally:
        live.kill()
        live.wait()


def test_only_rank_0_of_a_launched_run_takes_the_lock(tmp_path, monkeypatch):
    from dschat.runtime import lock

    monkeypatch.setenv("RANK", "1")
    with lock.output_lock(str(tmp_path / "out")) as held:  # rank 0 of the same run holds it
        assert held is None and not lock.lock_path(tmp_path / "out").exists()


def test_claiming_the_output_puts_back_what_a_killed_save_parked(tmp_path, monkeypatch):
    """A run's start (under the lock) finishes a dead save's carry-over in every model folder of its step."""
    import argparse

    from dschat.cli.outdir import claim_output_dir

    monkeypatch.delenv("RANK", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "s3"
    write(out / "actor", {**NEW, "training.log": "new\n"})
    parked = out / f".actor.tmp-{dead.pid}-x"
    write(parked, {**OLD, "notes.json": "mine", "training.log": "old\n"})
    args = argparse.Namespace(output_dir=str(out), actor_model_name_or_path="sft", overwrite_checkpoints=False)
    with claim_output_dir(args):
        assert tree(out / "actor") == {**NEW, "training.log": "new\n", "training.log.recovered": "old\n",
                                       "notes.json": "mine"}
        assert not parked.exists()


# ---------------------------------------------------------------- accumulation longer than the run

def test_accumulation_that_exceeds_the_run_is_refused_and_a_remainder_is_said():
    from dschat.runtime.accumulation import check_accumulation
    from dschat.runtime.errors import FlagError

    with pytest.raises(FlagError) as err:
        check_accumulation(3, 1, 8)  # 3 batches, windows of 8: zero optimizer steps
    message = str(err.value)
    assert "\n" not in message and message.startswith("--gradient_accumulation_steps 8 is more than the 3")
    assert "--gradient_accumulation_steps 3 or less" in message
    assert check_accumulation(3, 2, 4) == ("note: --gradient_accumulation_steps 4: the last 2 of the run's 6 "
                                           "micro-batches per rank (3 per epoch x 2 epochs) fill no accumulation "
                                           "window; their gradients are not applied (1 optimizer step)")
    assert check_accumulation(4, 2, 4) is None and check_accumulation(5, 1, 1) is None
    assert check_accumulation(0, 1, 4) is None  # no data: said elsewhere


def test_a_step_holds_its_output_for_the_whole_run(tmp_path, monkeypatch):
    """sft_main takes the lock before its run object is built and gives it back at the end, also on errors; a
    second run into the folder meanwhile is refused; a killed save's parked files are back before the run."""
    import dschat.trainers.sft as sft
    from dschat.cli import steps
    from dschat.runtime import lock
    from dschat.runtime.errors import FlagError

    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    write(out, NEW)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write(tmp_path / f".out.tmp-{dead.pid}-x", {**OLD, "notes.json": "mine"})
    argv = ["--output_dir", str(out), "--data_output_path", str(tmp_path / "cache")]
    seen: dict[str, object] = {}

    class FakeRun:
        def __init__(self, args):
            self.args = args
            seen["built"] = (lock.holder(out) or {}).get("pid"), (out / "notes.json").exists()

        def evaluate(self, when: str) -> None:
            with pytest.raises(FlagError, match=f"--output_dir {out} is in use by another run \\(pid {os.getpid()}"):
                steps.sft_main(argv)

        def train(self) -> None:
            if seen.get("fail"):
                raise RuntimeError("boom")

        def save(self) -> None:
            pass

        def summary(self) -> str:
            return "done"

    monkeypatch.setattr(sft, "SFTRun", FakeRun)
    steps.sft_main(argv)
    assert seen["built"] == (os.getpid(), True)
    assert lock.holder(out) is None and not lock.lock_path(out).exists()
    seen["fail"] = True
    with pytest.raises(RuntimeError):
        steps.sft_main(argv)
    assert not lock.lock_path(out).exists()


# ---- a full disk or read-only folder: one line naming the path and errno, nothing half-written (issue 30 item 10)

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors says


def test_full_disk_at_the_final_save_keeps_the_previous_model(tmp_path):
    import torch

    from dschat.runtime.errors import WriteError

    class FillsTheDisk(torch.nn.Linear):
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"half a model")
            raise Exception(NO_SPACE)

    out = tmp_path / "model"
    write(out, OLD)
    before = tree(out)
    with pytest.raises(WriteError, match=r"cannot save the model to .*model: No space left on device \(ENOSPC\); "
                                         r"nothing half-written was kept; the previous model there is intact"):
        export.save_hf_model(FillsTheDisk(2, 2), None, str(out))
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary sibling left


def test_full_disk_at_a_checkpoint_removes_the_partial_one(tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos": the disk's free space tells ENOSPC."""
    import collections
    import json
    import shutil

    from dschat.runtime import checkpoint
    from dschat.runtime.errors import WriteError

    class Engine:
        def save_checkpoint(self, path, tag, save_latest):
            Path(path, tag).mkdir(parents=True)
            Path(path, tag, "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    previous = tmp_path / "checkpoints" / "step1"
    previous.mkdir(parents=True)
    (previous / "state.json").write_text(json.dumps({"epoch": 0, "batch": 1, "step": 1, "rng": [{}]}))
    (tmp_path / "checkpoints" / "latest").write_text("step1")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(WriteError, match=r"cannot write checkpoint .*step2: No space left on device \(ENOSPC\); the "
                                         r"partial checkpoint was removed, the previous one \(.*step1\) is intact"):
        checkpoint.save(str(tmp_path), {"train": Engine()}, {"epoch": 0, "batch": 2, "step": 2})
    assert not (tmp_path / "checkpoints" / "step2").exists()
    assert checkpoint.latest(str(tmp_path)) == previous
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with free space it is not called a full disk
        checkpoint.save(str(tmp_path), {"train": Engine()}, {"epoch": 0, "batch": 2, "step": 2})


@pytest.mark.parametrize("fail, expected", [("save_to_disk", r"No space left on device \(ENOSPC\)"),
                                            ("mkdtemp", r"Read-only file system \(EROFS\)")])
def test_full_disk_or_read_only_data_cache_is_one_line(tmp_path, monkeypatch, fail, expected):
    import errno

    import datasets

    from dschat.data import phases
    from dschat.data.phases import DataSettings, load_phase_data
    from dschat.models.loading import load_tokenizer
    from dschat.runtime.errors import DatasetError

    def full(self, folder, *a, **k):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), k.get("dir"))

    if fail == "save_to_disk":
        monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    else:
        monkeypatch.setattr(phases.tempfile, "mkdtemp", read_only)
    cache = tmp_path / "cache"
    cache.mkdir()
    settings = DataSettings(data_path=("dschat/builtin",), data_split="2,4,4", phase=1, seed=1, max_seq_len=64)
    with pytest.raises(DatasetError, match=rf"--data_output_path {cache}: cannot write the tokenised data cache "
                                           rf"phase1_\w+ there: {expected}; nothing of it was kept"):
        load_phase_data(settings, load_tokenizer("builtin"), str(cache))
    assert list(cache.iterdir()) == []
