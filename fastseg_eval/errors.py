"""Error types. Every problem with a user's input raises a subclass of :class:`FastSegError`."""

from __future__ import annotations


class FastSegError(Exception):
    """Base class of every error fastseg-eval raises on purpose (the CLI prints its message)."""


class InputError(FastSegError, ValueError):
    """An input cannot be used: missing path, not a zarr array, shape or dtype mismatch, ..."""


class LabelError(FastSegError, ValueError):
    """A label value cannot be counted: negative, out of range, or not among the given labels.

    Attributes
    ----------
    role : str
        ``"gt"`` or ``"pred"``.
    value : int
        The offending value.
    position : tuple of int or None
        Voxel coordinates of the first offending voxel found, in the full volume.
    """

    def __init__(self, message: str, *, role: str, value: int, position: tuple[int, ...] | None):
        super().__init__(message)
        self.role = role
        self.value = value
        self.position = position

    def __reduce__(self):  # keyword-only arguments: pickle (dask workers, process pools) needs help
        return (_rebuild_label_error, (str(self), self.role, self.value, self.position))


def _rebuild_label_error(message: str, role: str, value: int, position: tuple[int, ...] | None) -> LabelError:
    return LabelError(message, role=role, value=value, position=position)


class OptionError(FastSegError, ValueError):
    """An option has an invalid value (unknown metric, empty policy, backend, ...)."""


class BackendError(FastSegError, RuntimeError):
    """The requested compute backend cannot run here (for example no GPU for ``backend='cuda'``)."""
