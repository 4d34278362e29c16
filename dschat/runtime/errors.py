"""The user errors of every entry point: each becomes one `error: ...` line and exit status 2.

They live at the bottom of the package so that any layer can raise them without importing upward.
"""

from __future__ import annotations


class DschatError(Exception):
    """Base of the errors a user can fix (a flag, a file, a model path); never shown as a traceback."""


class FlagError(DschatError, ValueError):
    """A flag value or combination that cannot work; the message names the flag."""


class DatasetError(DschatError, ValueError):
    """Bad dataset input: the message names the file, line, field or dataset."""


class ModelPathError(DschatError, ValueError):
    """A model path that does not exist or does not hold the expected kind of model."""


class CheckpointError(DschatError, RuntimeError):
    """A checkpoint that cannot be resumed: unreadable, unsafe to unpickle, or from other run settings."""


class NonFiniteLossError(DschatError, RuntimeError):
    """Too many consecutive updates with a NaN/inf loss."""


class NothingTrainedError(DschatError, RuntimeError):
    """A run that ended without applying a single update (so there is nothing to save)."""


class RewardFunctionError(DschatError, RuntimeError):
    """A reward function that raised or returned something other than one number (or None) per completion."""


class WriteError(DschatError, OSError):
    """A file that could not be written (full disk, quota, read-only folder): the message names the path and the
    errno, and says what was removed and what is intact."""


def write_errno(err: BaseException, folder: str | None = None) -> int | None:
    """The errno behind a failed write (a full disk, quota, read-only or unwritable folder, I/O error): an OSError's
    own (in `err` or what it was raised from), the "os error N" that safetensors and Rust libraries put in their
    text, or ENOSPC when the text says so or `folder`'s disk is full (torch.save says only "unexpected pos"); None
    when `err` is no such write failure."""
    import errno
    import re
    import shutil

    kinds = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno if seen.errno in kinds else None
        found = re.search(r"os error (\d+)", str(seen))
        if found and int(found.group(1)) in kinds:
            return int(found.group(1))
        if "No space left on device" in str(seen):
            return errno.ENOSPC
        seen = seen.__cause__ or seen.__context__
    if folder:
        try:
            if shutil.disk_usage(folder).free == 0:
                return errno.ENOSPC
        except OSError:
            pass
    return None


def describe_errno(number: int) -> str:
    """"No space left on device (ENOSPC)"."""
    import errno
    import os

    return f"{os.strerror(number)} ({errno.errorcode.get(number, number)})"
