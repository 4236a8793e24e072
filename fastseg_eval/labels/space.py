"""The label space: which values are labels, their order, the ignore label, and where each was found.

Shared by the CPU and CUDA counters (:mod:`fastseg_eval.reducers.confusion`,
:mod:`fastseg_eval.reducers.cuda`) through the public functions here:

* :func:`label_view`: labels as the unsigned integers the kernels read (bool, signed and
  big-endian inputs included), :func:`value_of` to read a kernel's bit pattern back;
* :func:`ignore_bits`, :func:`check_ignore`: the ignore label in a given dtype;
* :func:`fixed_labels`, :func:`check_num_classes`, :func:`is_range`: a label space given by
  ``num_classes`` or ``labels``;
* :func:`lookup_labels`, :func:`insert_labels`: the value -> index map (a direct lookup table
  below ``LUT_SIZE``, an open-addressing hash above it) that the kernels also probe;
  :class:`LabelTable` holds one such map on the host (the CUDA counter's label space);
* :func:`label_message`: the one message for a label that cannot be counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastseg_eval.errors import InputError, OptionError, option
from fastseg_eval.kernels import cpu
from fastseg_eval.kernels.jit import njit


def label_view(a: np.ndarray, role: str) -> tuple[np.ndarray, int]:
    """Return ``a`` as an unsigned-integer view the kernels accept, and its negative threshold.

    bool becomes uint8, signed ints the unsigned view of the same width (no copy); the second
    value is the unsigned value from which the original was negative (0 for unsigned inputs).
    Non-native byte order is converted (a same-width copy).
    """
    dt = a.dtype
    if dt.kind == "b":
        return a.view(np.uint8), 0
    if dt.kind not in "iu":
        what = "floating-point" if dt.kind == "f" else f"{dt} (kind {dt.kind!r})"
        hint = (
            f" For probability maps pass {option('threshold', '')} (binary) or "
            f"{option('channel_axis', '')} (argmax)."
            if dt.kind == "f"
            else ""
        )
        raise InputError(
            f"{role} has dtype {dt}: {what} values are not labels. Labels must be integers or bool.{hint}"
        )
    if not dt.isnative:
        a = a.astype(dt.newbyteorder("="))
        dt = a.dtype
    if dt.kind == "i":
        return a.view(np.dtype(f"u{dt.itemsize}")), 1 << (8 * dt.itemsize - 1)
    return a, 0


def value_of(bits: int, dtype: np.dtype) -> int:
    """The value of ``bits`` (a 64-bit pattern, as the CPU kernels store it in int64 or the CUDA
    kernels in uint64) read as label dtype ``dtype`` (bool, signed or unsigned)."""
    u = np.array(int(bits) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    if dtype.kind == "b":
        return int(u)
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return int(np.array(u, dtype=np.uint64).astype(unsigned).view(dtype.newbyteorder("=")))


def ignore_bits(ignore_label: int | None, dtype: np.dtype) -> tuple[int, bool]:
    """Unsigned bit pattern of the ignore label in ``dtype``, and whether it can occur at all."""
    if ignore_label is None:
        return 0, False
    if dtype.kind == "b":
        return (int(ignore_label), True) if ignore_label in (0, 1) else (0, False)
    info = np.iinfo(dtype)
    if not info.min <= ignore_label <= info.max:
        return 0, False
    nat = dtype.newbyteorder("=")
    bits = np.array(ignore_label, dtype=nat).view(np.dtype(f"u{nat.itemsize}"))
    return int(bits), True


def check_ignore(ignore_label: Any) -> int | None:
    if ignore_label is None:
        return None
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, (int, np.integer)):
        raise OptionError(f"ignore_label must be an integer, got {ignore_label!r}")
    return int(ignore_label)


def is_range(labels: Any) -> bool:
    if isinstance(labels, range):
        return labels.start == 0 and labels.step == 1
    if isinstance(labels, np.ndarray):
        return bool(np.array_equal(labels, np.arange(len(labels), dtype=labels.dtype)))
    return all(v == i for i, v in enumerate(labels))


def check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise OptionError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def fixed_labels(num_classes: Any, labels: Any, ignore_label: int | None) -> Any:
    if num_classes is not None and labels is not None:
        labels = [int(x) for x in labels]
        if len(labels) != num_classes:
            raise OptionError(
                f"{option('num_classes', num_classes)} but {option('labels')} has {len(labels)} labels; "
                "pass one of them"
            )
    if labels is not None:
        explicit = num_classes is None
        out = []
        for x in labels:
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                raise OptionError(f"labels must be integers, got {x!r}")
            if int(x) < 0:
                raise OptionError(f"labels must be non-negative, got {int(x)}")
            if int(x) >= 1 << 64:
                raise OptionError(f"label {int(x)} does not fit in 64 bits")
            out.append(int(x))
        if len(set(out)) != len(out):
            dup = next(x for x in out if out.count(x) > 1)
            raise OptionError(f"labels must be unique, {dup} appears twice")
        if not out:
            raise OptionError("labels is empty; give at least one label")
        if explicit and ignore_label is not None and ignore_label in out:
            raise OptionError(
                f"{option('ignore_label')} {ignore_label} is also listed in {option('labels')}; "
                "remove it from one of them"
            )
        return out
    if num_classes is not None:
        return range(check_num_classes(num_classes))  # not materialized: K may be 65536 or more
    return None


def table_capacity(kcap: int, need: int, dense: bool, dense_max: int) -> tuple[int, bool]:
    """Capacity and storage of a count table grown to hold ``need`` labels: capacity doubles until
    it fits; a dense K x K table stays dense while ``need <= dense_max`` (capped there), else the
    table switches to the diagonal + marginals (3 x K)."""
    while kcap < need:
        kcap *= 2
    dense = dense and need <= dense_max
    if dense:
        kcap = min(kcap, dense_max)
    return kcap, dense


def label_message(
    role: str, value: int, position: tuple[int, ...] | None, num_classes: int | None, labels: Any
) -> str:
    """The message for a label that cannot be counted: what it is, where, and which option to change."""
    where = f" at voxel {tuple(position)}" if position is not None else ""
    if value < 0:
        why = "negative labels cannot be counted"
        if role == "gt":
            why += f"; if it marks voxels to skip, pass {option('ignore_label', value)}"
    elif labels is not None:
        why = (
            f"it is not among the given labels; add it to {option('labels')} or, in gt, "
            f"pass {option('ignore_label', value)}"
        )
    elif num_classes is not None:
        k = num_classes
        why = f"{option('num_classes', k)} allows 0..{k - 1}; raise {option('num_classes')}"
        if role == "gt":
            why += f" or pass {option('ignore_label', value)}"
    else:
        why = "it cannot be counted"
    return f"{role} has label {value}{where}: {why}"


# small numba helpers for Python-side label bookkeeping ----------------------------------------

@njit(cache=True)
def lookup_labels(keys, lut, hkeys, hvals):
    """Index of each label value in ``keys`` (uint64), -1 where unknown (LUT below LUT_SIZE, else hash)."""
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = cpu.lookup_label(keys[i], lut, hkeys, hvals)
    return out


@njit(cache=True)
def insert_labels(keys, vals, lut, hkeys, hvals):
    """Map label values ``keys`` to indices ``vals`` (the hash must have room)."""
    for i in range(keys.shape[0]):
        cpu.insert_label(keys[i], vals[i], lut, hkeys, hvals)


class LabelTable:
    """A label space on the host: label values in order of arrival, and the value -> index map
    (LUT + hash, as the kernels probe it)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.lut = np.full(cpu.LUT_SIZE, -1, dtype=np.int32)
        self.hkeys = np.zeros(64, dtype=np.uint64)
        self.hvals = np.full(64, -1, dtype=np.int32)
        self.hcount = 0
        self.version = 0  # bumped whenever labels are added (copies elsewhere go stale)

    @property
    def n(self) -> int:
        return len(self.keys)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        return lookup_labels(values.astype(np.uint64), self.lut, self.hkeys, self.hvals)

    def add(self, values: np.ndarray) -> int:
        """Append the values of ``values`` not yet known (sorted); returns how many were new."""
        values = np.unique(values.astype(np.uint64))
        new = values[self.lookup(values) < 0]
        if not len(new):
            return 0
        big = int(np.count_nonzero(new >= np.uint64(cpu.LUT_SIZE)))
        if big:
            cap = len(self.hkeys)
            while 2 * (self.hcount + big + 1) > cap:
                cap *= 2
            if cap != len(self.hkeys):
                used = self.hvals >= 0
                keys, vals = self.hkeys[used], self.hvals[used]
                self.hkeys = np.zeros(cap, dtype=np.uint64)
                self.hvals = np.full(cap, -1, dtype=np.int32)
                insert_labels(keys, vals, self.lut, self.hkeys, self.hvals)
        ids = np.arange(self.n, self.n + len(new), dtype=np.int32)
        insert_labels(new, ids, self.lut, self.hkeys, self.hvals)
        self.hcount += big
        self.keys = np.concatenate([self.keys, new])
        self.version += 1
        return len(new)
