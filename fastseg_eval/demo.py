"""A small synthetic prediction / ground-truth pair: try the tool on a machine with no data.

The ground truth is background (label 0) with a few ellipsoid blobs of labels ``1 .. K-1``; the
prediction is the same blobs with smoothly perturbed, noisy boundaries, one blob partly given the
wrong label and one small false-positive blob, so every metric and warning has something to show.
Everything is deterministic for a given ``seed``. The benchmarks reuse :func:`make_demo_pair`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

DEMO_SHAPE = (96, 96, 96)
DEMO_CLASSES = 4
DEMO_CHUNKS = (32, 32, 32)
_MARKER = "fastseg_eval_demo"  # attribute that marks a store this module wrote (safe to overwrite)


def _shape3(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),) * 3
    out = tuple(int(s) for s in shape)
    if not out or any(s < 1 for s in out):
        raise ValueError(f"shape must be positive integers, got {shape!r}")
    return out


def make_demo_pair(
    shape: int | Sequence[int] = DEMO_SHAPE, num_classes: int = DEMO_CLASSES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic ``(pred, gt)`` pair of uint8 label volumes (prediction first).

    Parameters
    ----------
    shape : int or sequence of int
        Volume shape (an int means a cube). Any number of dimensions >= 1.
    num_classes : int
        Labels ``0 .. num_classes - 1``; 0 is background. Between 2 and 255.
    seed : int
        Seed of the random generator; the same seed gives the same volumes.

    Returns
    -------
    pred, gt : numpy.ndarray (uint8)

    Examples
    --------
    >>> pred, gt = make_demo_pair((24, 24, 24), 3, seed=1)
    >>> pred.shape, gt.dtype.name, sorted(set(np.unique(gt).tolist()) - {0}) == [1, 2]
    ((24, 24, 24), 'uint8', True)
    """
    shape = _shape3(shape)
    if not 2 <= int(num_classes) <= 255:
        raise ValueError(f"num_classes must be between 2 and 255, got {num_classes!r}")
    k = int(num_classes)
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    extent = np.array(shape, dtype=np.float64)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]

    gt = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    # smooth boundary perturbation: a few low-frequency waves
    wave = np.zeros(shape, dtype=np.float64)
    for _ in range(3):
        freq = rng.uniform(1.0, 3.0, ndim) * 2 * np.pi / extent
        phase = rng.uniform(0, 2 * np.pi, ndim)
        term = 1.0
        for ax in range(ndim):
            term = term * np.sin(grids[ax] * freq[ax] + phase[ax])
        wave += term
    wave *= 0.08

    nblobs = max(k - 1, 1) + 2  # every foreground label at least once, two extra blobs
    blob_labels = [1 + (i % (k - 1)) for i in range(nblobs)]
    for lab in blob_labels:
        centre = rng.uniform(0.2, 0.8, ndim) * extent
        radius = rng.uniform(0.08, 0.2, ndim) * extent + 1.0
        d2 = np.zeros(shape, dtype=np.float64)
        for ax in range(ndim):
            d2 = d2 + ((grids[ax] - centre[ax]) / radius[ax]) ** 2
        d = np.sqrt(d2)
        gt[d < 1.0] = lab
        pred[d < 1.0 + wave] = lab

    # noisy boundaries: flip a share of the voxels near any label edge to background
    edge = np.zeros(shape, dtype=bool)
    for ax in range(ndim):
        diff = np.diff(gt, axis=ax) != 0
        lo = [slice(None)] * ndim
        hi = [slice(None)] * ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    flip = edge & (rng.random(shape) < 0.3)
    pred[flip] = 0

    # one confusion between labels: a slab of the first blob's label predicted as the next label
    if k > 2:
        first = np.argwhere(gt == blob_labels[0])
        if len(first):
            cut = int(np.median(first[:, 0]))
            slab = [slice(None)] * ndim
            slab[0] = slice(cut, None)
            region = (gt == blob_labels[0]) & (pred == blob_labels[0])
            sub = np.zeros(shape, dtype=bool)
            sub[tuple(slab)] = True
            pred[region & sub] = blob_labels[1]

    # a small false-positive blob of the last label in the background
    centre = rng.uniform(0.1, 0.9, ndim) * extent
    d2 = np.zeros(shape, dtype=np.float64)
    for ax in range(ndim):
        d2 = d2 + ((grids[ax] - centre[ax]) / (0.04 * extent[ax] + 1.0)) ** 2
    pred[(d2 < 1.0) & (gt == 0)] = k - 1
    return pred, gt


def _is_demo_store(path: str) -> bool:
    import zarr

    try:
        node = zarr.open(store=path, mode="r")
    except Exception:
        return False
    return bool(node.attrs.get(_MARKER, False))


def write_demo_pair(
    directory: str | os.PathLike[str],
    *,
    shape: int | Sequence[int] = DEMO_SHAPE,
    num_classes: int = DEMO_CLASSES,
    seed: int = 0,
    chunks: int | Sequence[int] = DEMO_CHUNKS,
    zarr_format: int = 3,
) -> tuple[str, str]:
    """Write :func:`make_demo_pair` to ``directory/pred.zarr`` and ``directory/gt.zarr``.

    Stores a previous call wrote are replaced (each new store is written beside the old one and
    swapped in, so a failed write keeps the old store); any other existing ``pred.zarr`` /
    ``gt.zarr`` raises :class:`FileExistsError` rather than being overwritten, and a
    ``directory`` inside a zarr store raises :class:`~fastseg_eval.io.outputs.OutputPathError`.
    Returns the two paths (prediction first).
    """
    import zarr

    from fastseg_eval.io.outputs import OutputPathError, enclosing_store, replace_directory

    directory = os.fspath(directory)
    store = enclosing_store(directory)
    if store is not None:
        raise OutputPathError(
            f"demo directory {directory} lies inside the zarr store {store}; choose a directory outside it"
        )
    pred, gt = make_demo_pair(shape, num_classes, seed)
    chunk_shape = _shape3(chunks) if isinstance(chunks, (int, np.integer)) else tuple(int(c) for c in chunks)
    if len(chunk_shape) != pred.ndim:
        chunk_shape = tuple(min(32, s) for s in pred.shape)
    chunk_shape = tuple(min(c, s) for c, s in zip(chunk_shape, pred.shape))
    paths = (os.path.join(directory, "pred.zarr"), os.path.join(directory, "gt.zarr"))
    for p in paths:
        if os.path.exists(p) and not _is_demo_store(p):
            raise FileExistsError(
                f"{p} exists and was not written by the demo; choose another directory or remove it"
            )
    os.makedirs(directory, exist_ok=True)
    for p, data, role in zip(paths, (pred, gt), ("prediction", "ground truth")):

        def write(tmp: str, data: np.ndarray = data, role: str = role) -> None:
            arr = zarr.create_array(
                store=tmp, shape=data.shape, chunks=chunk_shape, dtype=data.dtype, zarr_format=zarr_format,
                fill_value=0, attributes={_MARKER: True, "role": role, "seed": int(seed)},
            )  # fmt: skip
            arr[...] = data

        replace_directory(p, write, what="demo")
    return paths
