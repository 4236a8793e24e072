"""Boundary metrics: surface-distance conventions and formulas over finished surface reducers.

Names (canonical first, aliases accepted wherever metrics are named):

* ``hd``: Hausdorff distance, the largest of the two directed maxima;
* ``hd95``: the ``hd_percentile``-th percentile (default 95) Hausdorff distance;
* ``assd``: average symmetric surface distance, the mean over the distances of *both* directions
  pooled (weighted by surfel area in the DeepMind convention);
* ``masd``: mean average surface distance, the mean of the two directed means;
* ``nsd``: normalized surface Dice at ``nsd_tolerance`` (physical units): the share of both
  surfaces lying within the tolerance of the other.

Distances are physical (``spacing`` in (z, y, x) order). Each convention (``surface=``) reproduces
one library's definitions; the differences are in the README's table and below:

``deepmind`` (default; the ``surface-distance`` package of Nikolov et al.)
    Surface points are voxel corners whose 2 x 2 x 2 neighbourhood is mixed; each carries the
    area of its surfels (marching-cubes normals, ``_NORMALS`` below, scaled by the spacing).
    Percentiles are area-weighted and step-wise: the first distance, in (distance, area) order,
    whose cumulative area share reaches p / 100 (``compute_robust_hausdorff``), per direction,
    then the larger; ``hd`` is that rule at 100. Means and NSD are area-weighted. The float
    arithmetic of the library (a sequential cumulative sum divided by numpy's pairwise total) is
    reproduced, so a share that lands exactly on p / 100 picks the same surfel.
``monai`` (``compute_hausdorff_distance``, ``compute_average_surface_distance``,
``compute_surface_dice`` with their defaults)
    Surface points are the voxels of the mask minus its 6-neighbour erosion (the border counts),
    each weighing 1. Distances are rounded to float32 as MONAI stores them; percentiles are
    ``torch.quantile`` (linear, its rank computed in float32) per direction, then the larger;
    NSD counts surface voxels (``use_subvoxels=False``) within the tolerance (compared in
    float32). MONAI's ``compute_average_surface_distance`` defaults to one direction
    (prediction to ground truth); ``assd`` here is its ``symmetric=True`` value (both directions
    pooled), ``masd`` the mean of its two directed values.
``medpy`` (``medpy.metric.binary`` ``hd``, ``hd95``, ``assd``, ``asd``)
    The same surface voxels as MONAI, float64 distances; ``hd95`` is ``np.percentile`` (linear)
    over both directions pooled; ``assd`` the pooled mean; ``masd`` the mean of ``asd`` both
    ways. MedPy defines no NSD, so ``nsd`` is refused with this convention.

Empty masks (one policy for all conventions, the libraries disagree): a label absent from both
volumes gives NaN for every boundary metric; absent from one of them, the distances are ``inf``
(or ``empty_distance`` when given) and ``nsd`` is 0. (DeepMind returns inf when both are empty,
MONAI NaN for ``hd95`` when one is, MedPy raises.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseg_eval.errors import OptionError, option
from fastseg_eval.kernels.surface import first_cumsum_reaching, pairwise_sum_runs

BOUNDARY_METRICS = ("hd", "hd95", "assd", "masd", "nsd")
DISTANCE_METRICS = ("hd", "hd95", "assd", "masd")
BOUNDARY_ALIASES: dict[str, str] = {
    **{m: m for m in BOUNDARY_METRICS},
    "hausdorff": "hd", "hausdorff_distance": "hd",
    "hd_95": "hd95", "hausdorff95": "hd95", "hausdorff_95": "hd95", "robust_hausdorff": "hd95",
    "average_symmetric_surface_distance": "assd",
    "mean_average_surface_distance": "masd",
    "normalized_surface_dice": "nsd", "normalised_surface_dice": "nsd", "surface_dice": "nsd",
}  # fmt: skip
SURFACES = ("deepmind", "monai", "medpy")
SURFACE_POINTS = {"deepmind": "corners", "monai": "voxels", "medpy": "voxels"}
"""What a surface point is in each convention (see :mod:`fastseg_eval.kernels.surface`)."""
DESCRIPTIONS = {
    "hd": "Hausdorff distance: max of the two directed maxima",
    "hd95": "percentile Hausdorff distance (hd_percentile, default 95)",
    "assd": "mean surface distance over both directions pooled",
    "masd": "mean of the two directed mean surface distances",
    "nsd": "normalized surface Dice at nsd_tolerance",
}


def is_boundary(name: str) -> bool:
    return name in BOUNDARY_METRICS


def boundary_name(name: str) -> str | None:
    """Canonical boundary metric name for ``name`` (an alias, any case), or None if it is none."""
    return BOUNDARY_ALIASES.get(name.strip().lower().replace("-", "_").replace(" ", "_"))


def check_boundary_options(
    names: Sequence[str],
    *,
    surface: str = "deepmind",
    spacing: Any = None,
    hd_percentile: Any = 95,
    nsd_tolerance: Any = 1.0,
    empty_distance: Any = None,
) -> tuple[float, float, float | None, tuple[float, float, float] | None]:
    """Validate the boundary options; returns (percentile, tolerance, empty_distance, spacing)."""
    if surface not in SURFACES:
        raise OptionError(f"{option('surface', repr(surface))} is not a convention; choose one of {', '.join(SURFACES)}")
    if surface == "medpy" and "nsd" in names:
        raise OptionError(
            f"MedPy defines no normalized surface Dice, so nsd cannot follow {option('surface', 'medpy')}; "
            f"use {option('surface', 'monai')} (the same surface voxels) or {option('surface', 'deepmind')}"
        )

    def number(name: str, v: Any, lo: float, hi: float = math.inf) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise OptionError(f"{option(name)} must be a finite number, got {v!r}")
        if not lo <= float(v) <= hi:
            raise OptionError(f"{option(name)} must be between {lo:g} and {hi:g}, got {v!r}")
        return float(v)

    pct = number("hd_percentile", hd_percentile, 0.0, 100.0)
    tol = number("nsd_tolerance", nsd_tolerance, 0.0)
    empty = None if empty_distance is None else number("empty_distance", empty_distance, 0.0)
    return pct, tol, empty, check_spacing(spacing)


def check_spacing(spacing: Any) -> tuple[float, float, float] | None:
    """``spacing`` as three positive floats (z, y, x); a single number means isotropic."""
    if spacing is None:
        return None
    if isinstance(spacing, (int, float, np.integer, np.floating)) and not isinstance(spacing, bool):
        spacing = (spacing,) * 3
    try:
        vals = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise OptionError(f"{option('spacing')} must be three numbers (z, y, x), got {spacing!r}") from None
    if len(vals) != 3 or not all(math.isfinite(s) and s > 0 for s in vals):
        raise OptionError(
            f"{option('spacing')} must be three positive numbers (z, y, x), got {spacing!r}"
        )
    return (vals[0], vals[1], vals[2])


# ---------------------------------------------------------------------- DeepMind's surfel areas
# Surfel normals per 2x2x2 neighbourhood code, times 8 (all components are multiples of 1/8),
# from DeepMind's surface-distance (lookup_tables.py, _NEIGHBOUR_CODE_TO_NORMALS; Apache-2.0,
# Copyright 2018 Google Inc.), made with the marching cubes algorithm. Codes are separated by
# " | " (four codes a line), the normals of one code by spaces. The vector's length is the surfel's area.
_NORMALS = (
    '0,0,0 | 1,1,1 | -1,-1,1 | -2,-2,0 2,2,0',
    '1,-1,1 | -2,0,-2 2,0,2 | 1,-1,1 -1,-1,1 | 4,0,0 2,2,2 1,1,1',
    '-1,1,1 | 1,1,1 -1,1,1 | -2,0,2 -2,0,2 | 4,0,0 -2,-2,2 -1,-1,1',
    '2,-2,0 2,-2,0 | 4,0,0 2,-2,2 -1,1,-1 | -4,0,0 -2,2,2 -1,1,1 | 4,0,0 4,0,0',
    '1,-1,-1 | 0,-2,-2 0,2,2 | -1,-1,1 1,-1,-1 | 0,-4,0 2,2,2 1,1,1',
    '1,-1,1 1,-1,-1 | 0,0,-4 2,2,2 -1,-1,-1 | -1,-1,1 1,-1,1 1,-1,-1 | -1,-1,-1 -2,-2,-2 2,2,2 1,1,1',
    '-1,1,1 1,-1,-1 | 0,-2,-2 0,2,2 -1,1,1 | -2,0,2 -2,0,2 1,-1,-1 | 1,1,1 3,3,3 0,-2,2 -2,0,2',
    '1,-1,-1 2,-2,0 2,-2,0 | 3,3,3 0,2,-2 -1,-1,-1 -2,2,0 | -4,0,0 -1,-1,-1 -2,-2,-2 1,1,1 | -4,0,0 -1,-1,-1 -2,-2,-2',
    '1,-1,1 | 1,1,1 1,-1,1 | 0,-2,2 0,2,-2 | 0,-4,0 1,1,-1 2,2,-2',
    '1,-1,1 1,-1,1 | 1,-1,1 -2,0,-2 2,0,2 | 0,-2,2 0,2,-2 1,-1,1 | -3,-3,3 0,2,2 1,1,-1 -2,0,-2',
    '-1,1,1 1,-1,1 | 1,1,1 1,-1,1 -1,1,1 | 0,0,4 -2,-2,2 -1,-1,1 | 2,2,-2 2,2,-2 1,1,-1 -1,-1,1',
    '1,-1,1 2,-2,0 2,-2,0 | 4,0,0 2,-2,2 -1,1,-1 1,-1,1 | 0,2,-2 3,-3,-3 -1,1,1 2,2,0 | -4,0,0 -2,-2,2 -1,-1,1',
    '2,-2,0 -2,2,0 | 0,4,0 -2,2,2 1,-1,-1 | 0,4,0 1,-1,1 -2,2,-2 | 0,4,0 0,-4,0',
    '2,-2,0 -2,2,0 1,-1,1 | -3,-3,-3 -2,0,2 -1,-1,-1 -2,2,0 | 1,1,1 0,-4,0 -2,-2,-2 -1,-1,-1 | 0,-4,0 -2,-2,-2 -1,-1,-1',
    '-1,1,1 2,-2,0 -2,2,0 | 0,4,0 2,2,-2 -1,-1,1 -1,-1,1 | -3,3,-3 -2,-2,0 -1,1,-1 -2,0,2 | 0,4,0 2,2,-2 -1,-1,1',
    '2,-2,0 -2,2,0 2,-2,0 2,-2,0 | -2,-2,0 -2,-2,0 -1,-1,1 | 1,1,1 -2,-2,0 -2,-2,0 | -2,-2,0 -2,-2,0',
    '-1,-1,1 | 1,1,1 -1,-1,1 | -1,-1,1 -1,-1,1 | -1,-1,1 -2,-2,0 2,2,0',
    '0,-2,2 0,-2,2 | 0,0,4 2,-2,2 1,-1,1 | 0,-2,2 0,-2,2 -1,-1,1 | 3,-3,3 0,-2,-2 -1,1,-1 2,2,0',
    '-1,-1,1 -1,1,1 | 1,1,1 -1,-1,1 -1,1,1 | -1,-1,1 -2,0,2 -2,0,2 | 4,0,0 -2,-2,2 -1,-1,1 -1,-1,1',
    '0,4,0 -2,2,-2 1,-1,1 | -2,2,-2 -2,2,-2 -1,1,-1 -1,1,-1 | -2,0,-2 3,-3,-3 0,2,-2 -1,1,1 | 4,0,0 -2,2,-2 1,-1,1',
    '-2,0,2 2,0,-2 | 0,0,4 -2,2,2 -1,1,1 | -1,-1,1 -2,0,2 2,0,-2 | -2,0,-2 -3,3,3 -2,-2,0 -1,1,1',
    '0,0,-4 2,2,-2 -1,-1,1 | 0,0,4 0,0,4 | 1,1,1 1,1,1 2,2,2 0,0,4 | 1,1,1 2,2,2 0,0,4',
    '-2,0,2 2,0,-2 -1,1,1 | 0,0,4 2,-2,2 1,-1,1 1,-1,1 | -2,0,2 -2,0,2 -2,0,2 2,0,-2 | 1,-1,1 2,0,2 2,0,2',
    '2,0,2 -3,-3,3 -2,2,0 -1,-1,1 | 0,0,4 2,-2,2 1,-1,1 | 1,1,1 2,0,2 2,0,2 | 2,0,2 2,0,2',
    '-1,-1,1 1,-1,1 | 1,1,1 -1,-1,1 1,-1,1 | -1,-1,1 0,-2,2 0,2,-2 | 0,-4,0 1,1,-1 2,2,-2 -1,-1,1',
    '0,-2,2 0,-2,2 1,-1,1 | 0,0,4 2,-2,2 1,-1,1 1,-1,1 | 0,-2,2 0,-2,2 0,-2,2 0,2,-2 | 0,2,2 0,2,2 1,-1,-1',
    '-1,1,1 1,-1,1 -1,-1,1 | -1,1,1 1,-1,1 -1,-1,1 1,1,1 | 0,0,4 -2,-2,2 -1,-1,1 -1,-1,1 | 1,1,1 1,-1,1 1,-1,-1',
    '0,4,0 -2,2,-2 1,-1,1 1,-1,1 | 1,1,1 -1,-1,1 1,-1,-1 | 0,-2,-2 0,2,2 1,1,1 | 1,1,1 1,-1,-1',
    '4,0,0 2,-2,-2 1,-1,-1 | -2,2,2 -1,1,1 -2,2,2 1,-1,-1 | 3,-3,3 0,2,2 -1,1,-1 -2,0,2 | 0,-4,0 -2,2,2 -1,1,1',
    '-3,-3,3 2,-2,0 0,2,2 -1,-1,1 | -1,1,1 -2,2,2 0,0,4 | 1,1,1 0,2,2 0,2,2 | 0,2,2 0,2,2',
    '4,0,0 2,2,2 1,1,1 1,1,1 | 1,-1,1 -1,-1,1 1,1,1 | -2,0,-2 2,0,2 1,1,1 | 1,1,1 1,-1,1',
    '-2,-2,0 2,2,0 1,1,1 | 1,1,1 -1,-1,1 | 1,1,1 1,1,1 | 1,1,1',
    '1,1,1 | 1,1,1 1,1,1 | 1,1,1 -1,-1,1 | -2,-2,0 2,2,0 1,1,1',
    '1,1,1 1,-1,1 | -2,0,-2 2,0,2 1,1,1 | 1,-1,1 -1,-1,1 1,1,1 | 4,0,0 2,2,2 1,1,1 1,1,1',
    '0,2,2 0,2,2 | 1,1,1 0,2,2 0,2,2 | -1,1,1 -2,2,2 0,0,4 | -3,-3,3 2,-2,0 0,2,2 -1,-1,1',
    '0,-4,0 -2,2,2 -1,1,1 | 3,-3,3 0,2,2 -1,1,-1 -2,0,2 | -2,2,2 -1,1,1 -2,2,2 1,-1,-1 | 4,0,0 2,-2,-2 1,-1,-1',
    '1,1,1 1,-1,-1 | 0,-2,-2 0,2,2 1,1,1 | 1,1,1 -1,-1,1 1,-1,-1 | 0,4,0 -2,2,-2 1,-1,1 1,-1,1',
    '1,1,1 1,-1,1 1,-1,-1 | 0,0,4 -2,-2,2 -1,-1,1 -1,-1,1 | -1,1,1 1,-1,1 -1,-1,1 1,1,1 | -1,1,1 1,-1,1 -1,-1,1',
    '0,2,2 0,2,2 1,-1,-1 | 0,-2,-2 0,2,2 0,2,2 0,2,2 | 0,0,4 2,-2,2 1,-1,1 1,-1,1 | 0,-2,2 0,-2,2 1,-1,1',
    '0,-4,0 1,1,-1 2,2,-2 -1,-1,1 | -1,-1,1 0,-2,2 0,2,-2 | 1,1,1 -1,-1,1 1,-1,1 | -1,-1,1 1,-1,1',
    '2,0,2 2,0,2 | 1,1,1 2,0,2 2,0,2 | 0,0,4 2,-2,2 1,-1,1 | 2,0,2 -3,-3,3 -2,2,0 -1,-1,1',
    '1,-1,1 2,0,2 2,0,2 | -2,0,-2 2,0,2 2,0,2 2,0,2 | 0,0,4 2,-2,2 1,-1,1 1,-1,1 | -2,0,2 2,0,-2 -1,1,1',
    '1,1,1 2,2,2 0,0,4 | 1,1,1 1,1,1 2,2,2 0,0,4 | 0,0,4 0,0,4 | 0,0,-4 2,2,-2 -1,-1,1',
    '-2,0,-2 -3,3,3 -2,-2,0 -1,1,1 | -1,-1,1 -2,0,2 2,0,-2 | 0,0,4 -2,2,2 -1,1,1 | -2,0,2 2,0,-2',
    '4,0,0 -2,2,-2 1,-1,1 | -2,0,-2 3,-3,-3 0,2,-2 -1,1,1 | -2,2,-2 -2,2,-2 -1,1,-1 -1,1,-1 | 0,4,0 -2,2,-2 1,-1,1',
    '4,0,0 -2,-2,2 -1,-1,1 -1,-1,1 | -1,-1,1 -2,0,2 -2,0,2 | 1,1,1 -1,-1,1 -1,1,1 | -1,-1,1 -1,1,1',
    '3,-3,3 0,-2,-2 -1,1,-1 2,2,0 | 0,-2,2 0,-2,2 -1,-1,1 | 0,0,4 2,-2,2 1,-1,1 | 0,-2,2 0,-2,2',
    '-1,-1,1 -2,-2,0 2,2,0 | -1,-1,1 -1,-1,1 | 1,1,1 -1,-1,1 | -1,-1,1',
    '-2,-2,0 -2,-2,0 | 1,1,1 -2,-2,0 -2,-2,0 | -2,-2,0 -2,-2,0 -1,-1,1 | -2,-2,0 -2,-2,0 -2,-2,0 2,2,0',
    '0,4,0 2,2,-2 -1,-1,1 | -3,3,-3 -2,-2,0 -1,1,-1 -2,0,2 | 0,4,0 2,2,-2 -1,-1,1 -1,-1,1 | -1,1,1 2,-2,0 -2,2,0',
    '0,-4,0 -2,-2,-2 -1,-1,-1 | 1,1,1 0,-4,0 -2,-2,-2 -1,-1,-1 | -3,-3,-3 -2,0,2 -1,-1,-1 -2,2,0 | 2,-2,0 -2,2,0 1,-1,1',
    '0,4,0 0,-4,0 | 0,4,0 1,-1,1 -2,2,-2 | 0,4,0 -2,2,2 1,-1,-1 | 2,-2,0 -2,2,0',
    '-4,0,0 -2,-2,2 -1,-1,1 | 0,2,-2 3,-3,-3 -1,1,1 2,2,0 | 4,0,0 2,-2,2 -1,1,-1 1,-1,1 | 1,-1,1 2,-2,0 2,-2,0',
    '2,2,-2 2,2,-2 1,1,-1 -1,-1,1 | 0,0,4 -2,-2,2 -1,-1,1 | 1,1,1 1,-1,1 -1,1,1 | -1,1,1 1,-1,1',
    '-3,-3,3 0,2,2 1,1,-1 -2,0,-2 | 0,-2,2 0,2,-2 1,-1,1 | 1,-1,1 -2,0,-2 2,0,2 | 1,-1,1 1,-1,1',
    '0,-4,0 1,1,-1 2,2,-2 | 0,-2,2 0,2,-2 | 1,1,1 1,-1,1 | 1,-1,1',
    '-4,0,0 -1,-1,-1 -2,-2,-2 | -4,0,0 -1,-1,-1 -2,-2,-2 1,1,1 | 3,3,3 0,2,-2 -1,-1,-1 -2,2,0 | 1,-1,-1 2,-2,0 2,-2,0',
    '1,1,1 3,3,3 0,-2,2 -2,0,2 | -2,0,2 -2,0,2 1,-1,-1 | 0,-2,-2 0,2,2 -1,1,1 | -1,1,1 1,-1,-1',
    '-1,-1,-1 -2,-2,-2 2,2,2 1,1,1 | -1,-1,1 1,-1,1 1,-1,-1 | 0,0,-4 2,2,2 -1,-1,-1 | 1,-1,1 1,-1,-1',
    '0,-4,0 2,2,2 1,1,1 | -1,-1,1 1,-1,-1 | 0,-2,-2 0,2,2 | 1,-1,-1',
    '4,0,0 4,0,0 | -4,0,0 -2,2,2 -1,1,1 | 4,0,0 2,-2,2 -1,1,-1 | 2,-2,0 2,-2,0',
    '4,0,0 -2,-2,2 -1,-1,1 | -2,0,2 -2,0,2 | 1,1,1 -1,1,1 | -1,1,1',
    '4,0,0 2,2,2 1,1,1 | 1,-1,1 -1,-1,1 | -2,0,-2 2,0,2 | 1,-1,1',
    '-2,-2,0 2,2,0 | -1,-1,1 | 1,1,1 | 0,0,0',
)


def _normals() -> list[np.ndarray]:
    codes = " | ".join(_NORMALS).split(" | ")
    assert len(codes) == 256
    return [np.array([[int(v) / 8 for v in n.split(",")] for n in c.split()], dtype=np.float64) for c in codes]


def surfel_areas(spacing: Sequence[float]) -> np.ndarray:
    """Surfel area (physical units squared) of each of the 256 neighbourhood codes.

    The same arithmetic as ``create_table_neighbour_code_to_surface_area`` so that the areas are
    bit-identical to the library's (they decide ties in the weighted percentile).
    """
    out = np.zeros(256)
    for code, normals in enumerate(_normals()):
        total: Any = 0
        for k in range(normals.shape[0]):
            n = np.zeros(3)
            n[0] = normals[k, 0] * spacing[1] * spacing[2]
            n[1] = normals[k, 1] * spacing[0] * spacing[2]
            n[2] = normals[k, 2] * spacing[0] * spacing[1]
            total += np.linalg.norm(n)
        out[code] = total
    return out


# ---------------------------------------------------------------------- directed distances
@dataclass
class Directed:
    """The distances from every surface point of one side to the other side's surface.

    ``distance`` sorted ascending (float64, physical), ``code`` the neighbourhood code of each
    entry (0 for voxel conventions), ``count`` how many surface points share the pair.
    """

    distance: np.ndarray
    code: np.ndarray
    count: np.ndarray

    @property
    def n(self) -> int:
        return int(self.count.sum())


def _runs(values: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by (value, weight) and merge equal pairs: the library's order of ``sorted(zip(d, a))``."""
    order = np.lexsort((weights, values))
    v, w, c = values[order], weights[order], counts[order]
    if v.size == 0:
        return v, w, c
    new = np.ones(v.size, bool)
    new[1:] = (v[1:] != v[:-1]) | (w[1:] != w[:-1])
    starts = np.flatnonzero(new)
    return v[starts], w[starts], np.add.reduceat(c, starts)


def _at(values: np.ndarray, counts: np.ndarray, pos: int) -> float:
    """Element ``pos`` of ``np.repeat(values, counts)``."""
    return float(values[np.searchsorted(np.cumsum(counts), pos, side="right")])


def _deepmind_percentile(d: np.ndarray, area: np.ndarray, count: np.ndarray, percent: float) -> float:
    """``compute_robust_hausdorff`` for one direction (``d`` and ``area`` in (d, area) order)."""
    n = int(count.sum())
    if n == 0:
        return math.inf
    total = pairwise_sum_runs(area, count)
    idx = first_cumsum_reaching(area, count, total, percent / 100.0)
    return _at(d, count, min(idx, n - 1))


def _torch_quantile(d32: np.ndarray, count: np.ndarray, q: float) -> float:
    """``torch.quantile(t, q)`` (linear) of a float32 tensor: q and the rank are float32."""
    n = int(count.sum())
    f32 = np.float32
    rank = f32(f32(q) * f32(n - 1))
    below = int(rank)
    above = int(math.ceil(float(rank)))
    w = f32(rank - f32(below))
    vb, va = f32(_at(d32, count, below)), f32(_at(d32, count, above))
    if abs(w) < 0.5:
        return float(f32(vb + w * f32(va - vb)))
    return float(f32(va - f32(f32(va - vb) * f32(f32(1) - w))))


def _numpy_percentile(d: np.ndarray, count: np.ndarray, p: float) -> float:
    """``np.percentile(np.repeat(d, count), p)`` (method 'linear')."""
    n = int(count.sum())
    q = np.true_divide(p, 100)
    virtual = (n - 1) * q
    prev = math.floor(virtual)
    nxt = min(prev + 1, n - 1)
    gamma = virtual - prev
    a, b = _at(d, count, prev), _at(d, count, nxt)
    diff = b - a
    return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def label_values(
    names: Sequence[str],
    gt_to_pred: Directed,
    pred_to_gt: Directed,
    *,
    surface: str,
    spacing: Sequence[float],
    hd_percentile: float = 95.0,
    nsd_tolerance: float = 1.0,
    empty_distance: float | None = None,
    areas: np.ndarray | None = None,
) -> dict[str, float]:
    """Boundary metrics ``names`` of one label from its two directed distance sets.

    ``gt_to_pred.n`` is the number of ground-truth surface points (0: the label is absent from
    the ground truth), likewise ``pred_to_gt``. See the module docstring for the conventions
    and the empty policy.
    """
    n_gt, n_pred = gt_to_pred.n, pred_to_gt.n
    if n_gt == 0 and n_pred == 0:
        return {m: math.nan for m in names}
    if n_gt == 0 or n_pred == 0:
        far = math.inf if empty_distance is None else float(empty_distance)
        return {m: (0.0 if m == "nsd" else far) for m in names}
    dirs = (gt_to_pred, pred_to_gt)
    out: dict[str, float] = {}
    if surface == "deepmind":
        if areas is None:
            areas = surfel_areas(spacing)
        runs = [_runs(x.distance, areas[x.code], x.count) for x in dirs]
        for m in names:
            if m in ("hd", "hd95"):
                pct = 100.0 if m == "hd" else hd_percentile
                out[m] = max(_deepmind_percentile(d, a, c, pct) for d, a, c in runs)
            elif m in ("assd", "masd"):
                sums = [(float(np.sum(d * a * c)), float(np.sum(a * c))) for d, a, c in runs]
                if m == "assd":
                    out[m] = (sums[0][0] + sums[1][0]) / (sums[0][1] + sums[1][1])
                else:
                    out[m] = (sums[0][0] / sums[0][1] + sums[1][0] / sums[1][1]) / 2
            elif m == "nsd":
                near = sum(float(np.sum((a * c)[d <= nsd_tolerance])) for d, a, c in runs)
                out[m] = near / sum(float(np.sum(a * c)) for _, a, c in runs)
        return out
    f32 = surface == "monai"
    vals = []
    for x in dirs:
        d = x.distance.astype(np.float32).astype(np.float64) if f32 else x.distance
        v, _, c = _runs(d, np.zeros_like(d), x.count)
        vals.append((v, c))
    pooled = _runs(np.concatenate([v for v, _ in vals]), np.zeros(sum(v.size for v, _ in vals)),
                   np.concatenate([c for _, c in vals]))  # fmt: skip
    pv, pc = pooled[0], pooled[2]
    for m in names:
        if m == "hd":
            out[m] = max(float(v[-1]) for v, _ in vals)
        elif m == "hd95":
            if surface == "monai":
                out[m] = max(_torch_quantile(v, c, hd_percentile / 100) for v, c in vals)
            else:
                out[m] = _numpy_percentile(pv, pc, hd_percentile)
        elif m == "assd":
            out[m] = float(np.sum(pv * pc) / pc.sum())
        elif m == "masd":
            out[m] = (float(np.sum(vals[0][0] * vals[0][1]) / vals[0][1].sum())
                      + float(np.sum(vals[1][0] * vals[1][1]) / vals[1][1].sum())) / 2  # fmt: skip
        elif m == "nsd":
            tol = np.float32(nsd_tolerance) if f32 else nsd_tolerance
            near = sum(int(c[v <= tol].sum()) for v, c in vals)
            out[m] = near / sum(int(c.sum()) for _, c in vals)
    return out


def boundary_columns(
    distances: Mapping[int, tuple[Any, Any]],
    labels: Sequence[int] | np.ndarray,
    names: Sequence[str],
    *,
    surface: str,
    spacing: Sequence[float],
    hd_percentile: float = 95.0,
    nsd_tolerance: float = 1.0,
    empty_distance: float | None = None,
    skip: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Per-label columns (in the order of ``labels``) of the boundary metrics ``names``.

    ``distances`` maps a label to its (gt -> pred, pred -> gt) distances (objects with
    ``distance``, ``code`` and ``count`` arrays, as the surface reducer gives them); a label it
    lacks is absent from both volumes. Labels in ``skip`` (the background) are NaN.
    """
    areas = surfel_areas(spacing) if surface == "deepmind" else None
    none = Directed(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64))
    out = {m: np.full(len(labels), np.nan) for m in names}
    skipped = {int(s) for s in skip}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        if int(lab) in skipped:
            continue
        pair = distances.get(int(lab))
        g2p, p2g = (none, none) if pair is None else (Directed(p.distance, p.code, p.count) for p in pair)
        vals = label_values(
            names, g2p, p2g, surface=surface, spacing=spacing, hd_percentile=hd_percentile,
            nsd_tolerance=nsd_tolerance, empty_distance=empty_distance, areas=areas,
        )  # fmt: skip
        for m, v in vals.items():
            out[m][i] = v
    return out
