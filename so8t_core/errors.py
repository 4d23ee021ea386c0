"""Errors that reach the user as one line: where, what, and how to fix it.

Everything the user can cause (a bad checkpoint, a missing file, a NaN weight, an
unsupported option) is raised as an :class:`So8tError`. The CLI prints ``str(err)``
and exits non-zero; anything else is a bug in so8t-gguf and keeps its traceback.
"""

from __future__ import annotations


def short_repr(value, limit: int = 80) -> str:
    """A value from an input file, for a message: its repr, cut short (corrupt input can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class So8tError(Exception):
    """A problem with the input or the environment, reported as one line."""

    exit_code = 2

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where = where
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.hint:
            text += f" (hint: {self.hint})"
        # Whatever the parts contain, the message stays on one line.
        return " ".join(text.split())

    def __reduce__(self):  # keep the fields across pickling (Prefect, Dask workers)
        return (type(self), (self.where, self.problem, self.hint))


class CheckpointError(So8tError):
    """The source checkpoint is missing, malformed, or not what its files claim."""


class UnsupportedError(So8tError):
    """The input is valid but asks for something so8t-gguf does not do (yet)."""


class RotationError(So8tError):
    """An SO8T rotation gate is malformed: wrong shape, not finite, not a rotation."""


class StorageError(So8tError):
    """Reading or writing a URI failed (tasks retry it: object stores fail a share of requests)."""


class StorageAccessError(StorageError):
    """Storage refused for a reason that retrying cannot change: no permission, bad credentials,
    a missing bucket, a file where a folder must be, a read-only file system. Never retried."""


class InputChangedError(So8tError):
    """An input file changed while a run was using it (retrying cannot help: run again)."""


class CalibrationError(So8tError):
    """Calibration text for an importance matrix is unreadable, malformed or too short."""


class ValidationError(So8tError):
    """A produced GGUF failed a validation gate; it is not published."""


class CatalogError(So8tError):
    """A catalog of models to (re-)quantize is unreadable or invalid, or some of its models failed."""


class ClusterError(So8tError):
    """The Dask cluster to run on cannot be reached or has no workers."""
