"""Semantic masks -> instances: connected components per class, in memory (connected-components-3d).

Instance metrics compare instances; a semantic segmentation (a class per voxel, e.g. lesion /
no lesion) has none until each class is split into its connected components.
:func:`label_components` reads a whole volume into memory and labels it with the
connected-components-3d package (``cc3d``; the ``instances`` extra): every connected region of
one class becomes an instance, with its own id, and regions of different classes are never
joined. Out-of-core labelling (over chunks, with merges across chunk borders) is not available
yet: a volume whose labelling does not fit the memory budget (:mod:`fastseg_eval.memory`) is
refused with the estimate, before anything is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastseg_eval.errors import FastSegError, InputError, OptionError, option
from fastseg_eval.io.volume import Volume
from fastseg_eval.memory import format_bytes, memory_budget

CONNECTIVITIES = {3: (6, 18, 26), 2: (4, 8)}
"""Neighbourhoods cc3d offers, by number of dimensions."""

MISSING_CC3D = (
    "labelling connected components needs the connected-components-3d package: "
    "pip install 'fastseg-eval[instances]' (or pip install connected-components-3d)"
)

BYTES_PER_VOXEL_WORK = 12
"""cc3d's own memory per voxel on top of its input and output (union-find table, worst case)."""


def check_connectivity(connectivity: Any, ndim: int | None = None) -> int | None:
    """A valid neighbourhood for ``ndim`` dimensions (6, 18, 26 in 3-D; 4, 8 in 2-D), or None."""
    if connectivity is None:
        return None
    allowed = sorted({c for cs in CONNECTIVITIES.values() for c in cs})
    if isinstance(connectivity, bool) or not isinstance(connectivity, (int, np.integer)) or connectivity not in allowed:
        raise OptionError(f"{option('connectivity')} must be one of {allowed}, got {connectivity!r}")
    if ndim is not None:
        ok = CONNECTIVITIES.get(ndim)
        if ok is None:
            raise OptionError(
                f"{option('connectivity', connectivity)}: connected components are labelled in 2-D or 3-D "
                f"volumes, these have {ndim} dimensions"
            )
        if connectivity not in ok:
            raise OptionError(
                f"{option('connectivity', connectivity)} is not a {ndim}-D neighbourhood: use one of {list(ok)}"
            )
    return int(connectivity)


def components_bytes(shape: tuple[int, ...], dtypes: list[np.dtype]) -> int:
    """Memory to label one volume of each dtype in ``dtypes`` (input read whole, output, cc3d's work)."""
    n = int(np.prod(shape, dtype=np.int64))
    out = 8 if n >= 2**32 else 4
    return sum(n * (dt.itemsize + 2 * out + BYTES_PER_VOXEL_WORK) for dt in dtypes)


def check_components_memory(vols: list[Volume], memory_limit: Any = None) -> None:
    """Refuse, before reading anything, volumes whose in-memory labelling exceeds the budget."""
    shape = vols[0].shape
    need = components_bytes(shape, [v.dtype for v in vols])
    budget, origin = memory_budget(memory_limit)
    if need > budget:
        raise InputError(
            f"labelling connected components reads the volumes into memory: {'x'.join(map(str, shape))} "
            f"voxels need about {format_bytes(need)}, more than the memory budget of {format_bytes(budget)} "
            f"({origin}). Out-of-core labelling is not available yet: label the instances beforehand (one id "
            f"per instance) and evaluate them without {option('connectivity')}, evaluate a smaller region, or "
            f"raise {option('memory_limit', '')} on a machine with more memory"
        )


def label_components(
    volume: Volume,
    connectivity: int,
    *,
    background: int | None = 0,
    ignore_label: int | None = None,
) -> tuple[np.ndarray, dict[int, int], int | None]:
    """Label each class of ``volume`` into connected components, in memory.

    Voxels of class ``background`` (None: no class is background) get id 0; each connected
    region of another class gets its own id (1, 2, ... in raster order). Voxels equal to
    ``ignore_label`` (ground truth) are left out of every component and get one id of their
    own, returned third (None when no voxel has it), so that counting can skip them.

    Returns ``(ids, classes, ignore_id)``: ``ids`` an unsigned array of the volume's shape and
    ``classes`` the class of each instance id.
    """
    try:
        import cc3d
    except ImportError:
        raise FastSegError(MISSING_CC3D) from None
    a = np.asarray(volume.read(tuple(slice(0, n) for n in volume.shape)))
    if a.dtype.kind == "b":
        a = a.view(np.uint8)
    if a.dtype.kind not in "iu":
        raise InputError(
            f"{volume.role} has dtype {a.dtype}: connected components are labelled in integer class labels"
        )
    drop = np.zeros(a.shape, dtype=bool)
    if background is not None:
        drop |= a == background
    ignored = None
    if ignore_label is not None:
        ignored = a == ignore_label
        drop |= ignored
    if a.dtype.kind == "i" and (a[~drop] < 0).any():
        bad = np.argwhere((a < 0) & ~drop)[0]
        raise InputError(
            f"{volume.role} has class {int(a[tuple(bad)])} at voxel {tuple(int(x) for x in bad)}: negative "
            "classes cannot be labelled into components"
        )
    # cc3d leaves 0 unlabelled: classes as 1 + value, 0 where dropped (a copy only when needed)
    if background == 0 and ignored is None and a.dtype.kind == "u" and a.flags.writeable:
        classes_in = a  # cc3d takes a writeable buffer (a decoded file may come read-only)
    else:
        wide = np.uint64 if a.dtype.itemsize >= 4 else np.uint32
        classes_in = a.astype(wide) + wide(1)
        classes_in[drop] = 0
    ids = cc3d.connected_components(classes_in, connectivity=connectivity)
    n = int(ids.max()) if ids.size else 0
    cls = np.zeros(n + 1, dtype=a.dtype)
    cls[ids.reshape(-1)] = a.reshape(-1)
    classes = {i: int(c) for i, c in enumerate(cls.tolist()) if i > 0}
    ignore_id = None
    if ignored is not None and ignored.any():
        if n + 1 > np.iinfo(ids.dtype).max:
            ids = ids.astype(np.uint64)
        ignore_id = n + 1
        ids[ignored] = ignore_id
    return ids, classes, ignore_id
