"""Error types. Every problem with a user's input raises a subclass of :class:`FastSegError`.

Messages name options through :func:`option`, so that one message reads ``num_classes=3`` to a
Python caller (``str(error)``) and ``--num-classes 3`` on the command line, which spells the
names with :meth:`FastSegError.spell`. Warnings that name options are :class:`Message` strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_NO_VALUE: Any = object()
_OPTION = re.compile("\x02([^\x02\x03\x1f]*)(?:\x1f([^\x02\x03]*))?\x03")


def option(name: str, value: Any = _NO_VALUE) -> str:
    """An option named inside a message, spelled later for its reader.

    ``option("num_classes", 3)`` reads ``num_classes=3`` in Python and ``--num-classes 3`` on the
    command line; ``option("prob_scale")`` reads ``prob_scale`` / ``--prob-scale``; an empty value,
    ``option("threshold", "")``, reads ``threshold=`` / ``--threshold``.
    """
    return f"\x02{name}\x03" if value is _NO_VALUE else f"\x02{name}\x1f{value}\x03"


def spell(text: str, flag: Callable[[str], str | None] | None = None) -> str:
    """``text`` with its :func:`option` names spelled for Python, or as ``flag(name)`` (a flag).

    A name for which ``flag`` returns None keeps its Python spelling.
    """

    def one(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        f = None if flag is None else flag(name)
        if f is None:
            return name if value is None else f"{name}={value}"
        return f + (f" {value}" if value else "")

    return _OPTION.sub(one, text)


class Message(str):
    """Text naming options (a warning): reads in Python spelling, :meth:`spell` gives other spellings."""

    template: str

    def __new__(cls, template: str) -> Message:
        obj = super().__new__(cls, spell(template))
        obj.template = template
        return obj

    def spell(self, flag: Callable[[str], str | None]) -> str:
        return spell(self.template, flag)

    def __reduce__(self):
        return (Message, (self.template,))


class FastSegError(Exception):
    """Base class of every error fastseg-eval raises on purpose (the CLI prints its message)."""

    def __str__(self) -> str:
        return spell(super().__str__())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def spell(self, flag: Callable[[str], str | None]) -> str:
        """The message with the options it names spelled by ``flag(name)`` (the CLI's flags)."""
        return spell(super().__str__(), flag)


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
        message = self.args[0] if self.args else ""  # keeps the options' names (see spell)
        return (_rebuild_label_error, (message, self.role, self.value, self.position))


def _rebuild_label_error(message: str, role: str, value: int, position: tuple[int, ...] | None) -> LabelError:
    return LabelError(message, role=role, value=value, position=position)


class OptionError(FastSegError, ValueError):
    """An option has an invalid value (unknown metric, empty policy, backend, ...)."""


class BackendError(FastSegError, RuntimeError):
    """The requested compute backend cannot run here (for example no GPU for ``backend='cuda'``)."""
