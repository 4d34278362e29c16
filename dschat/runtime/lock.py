"""One run per output folder: a lock file beside --output_dir, held by the run's rank 0 for the whole run.

The lock is `.<name>.dschat-lock` in the output folder's parent (beside it, not inside: a save swaps the
folder itself), holding the owner's pid, host and process start time as JSON, and an flock on it while the
run lives. A second run into the same folder is refused in one line naming the folder and the owner's pid.
A lock whose process is gone (SIGKILL, a crash, a reboot; same host) is taken over, and said so in one line;
one written on another host is refused (its pid cannot be checked from here: the message says to remove the
file if that run is gone). The lock goes when the run ends
(normally, by an error, Ctrl-C or SIGTERM, which the entry points turn into exceptions); a SIGKILL leaves the
file, which the next run takes over. All ranks of one launched run are one run: only rank 0 (RANK, set by
the launcher before any process group exists) takes it. No torch import: e2e_rlhf.py asks `holder` too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dschat.runtime.errors import FlagError


def lock_path(out_dir: str | Path) -> Path:
    """Where the lock of `out_dir` lives: `.<name>.dschat-lock` beside it."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.dschat-lock"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None where unknown."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` runs (and, when `start` is given and known here, is the one started then); a zombie
    (exited, not yet reaped: a killed trainer whose parent died first can stay one) does not run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = _stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    now = fields[19] if fields else None
    return start is None or now is None or now == start  # a reused pid is another process


def _owner(fd: int) -> dict[str, Any]:
    """The JSON a lock file holds ({} when empty or unreadable: a lock being written, or a foreign file)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _refuse(out_dir: str, owner: dict[str, Any], path: Path, elsewhere: bool = False) -> FlagError:
    hint = f" (or remove {path} if that run is gone)" if elsewhere else ""
    return FlagError(f"--output_dir {out_dir} is in use by another run (pid {owner.get('pid', '?')} on "
                     f"{owner.get('host', '?')}, lock {path}); wait for it to end or use another --output_dir{hint}")


def acquire(out_dir: str) -> int:
    """Take the lock of `out_dir` (refuse a live owner, take over a dead one's); returns the locked descriptor."""
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
    for _ in range(10):  # the file may be replaced between open and flock by an owner releasing it
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise _refuse(out_dir, owner, path) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:
            os.close(fd)
            continue
        owner = _owner(fd)
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != me["pid"]:
            elsewhere = owner.get("host") != me["host"]
            if elsewhere or pid_alive(pid, owner.get("start")):
                os.close(fd)  # a live process on this host that holds no flock, or one on another host
                raise _refuse(out_dir, owner, path, elsewhere)
            print(f"note: --output_dir {out_dir}: took over the lock of pid {pid} on {owner.get('host')}, which is "
                  f"no longer running ({path})", flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        return fd
    raise _refuse(out_dir, {}, path)


def holder(out_dir: str | Path) -> dict[str, Any] | None:
    """The owner ({pid, host, ...}) of a run that holds `out_dir`'s lock now, or None (no lock, or a stale one)."""
    path = lock_path(out_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        owner = _owner(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return owner or {"pid": "?", "host": "?"}
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and (owner.get("host") != socket.gethostname()
                                                            or pid_alive(pid, owner.get("start"))):
            return owner
        return None
    finally:
        os.close(fd)


def release(out_dir: str, fd: int) -> None:
    """Remove the lock file of `out_dir` (while still holding it) and close its descriptor."""
    path = lock_path(out_dir)
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out_dir: str | None) -> Iterator[Path | None]:
    """Hold the lock of `out_dir` for the block on rank 0 (other ranks and runs without an output: nothing)."""
    if not out_dir or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    fd = acquire(out_dir)
    try:
        yield lock_path(out_dir)
    finally:
        release(out_dir, fd)
