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
