"""Do prediction and ground truth lie on the same voxel grid in physical space?

Two label volumes of the same shape can still disagree voxel for voxel: a prediction saved
with another spacing, a flipped axis, a shifted origin (a prediction written by a resampling
step that was not undone). Their counts would be computed without complaint and mean nothing.
:func:`check_geometry` compares what both inputs' headers say (:class:`~fastseg_eval.io.volume.Volume`
``spacing``, ``origin``, ``direction``) and raises one error naming both when they disagree:

* spacing: relative difference at most :data:`TOLERANCE` per axis;
* origin: at most :data:`TOLERANCE` of the smallest voxel size (world units) per coordinate;
* direction: each axis's unit vector within :data:`TOLERANCE` per component.

Only what both sides know is compared (a ``.npy`` has no geometry; a TIFF has spacing but no
origin). 1e-4 is loose enough for headers stored in float32 (NIfTI) and tight enough to catch
any real resampling or flip.
"""

from __future__ import annotations

from typing import Any

from fastseg_eval.errors import InputError, option

TOLERANCE = 1e-4


def _fmt(values: Any) -> str:
    if values and isinstance(values[0], (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in values) + ")"
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def geometry_mismatch(a: Any, b: Any, *, tolerance: float = TOLERANCE) -> list[str]:
    """What differs between the geometries of volumes ``a`` and ``b`` (empty: they agree)."""
    out: list[str] = []
    sa, sb = getattr(a, "spacing", None), getattr(b, "spacing", None)
    if sa is not None and sb is not None:
        if len(sa) != len(sb) or any(
            abs(x - y) > tolerance * max(abs(x), abs(y)) for x, y in zip(sa, sb)
        ):
            out.append(f"spacing {_fmt(sa)} vs {_fmt(sb)}")
    oa, ob = getattr(a, "origin", None), getattr(b, "origin", None)
    if oa is not None and ob is not None:
        sizes = [abs(float(x)) for x in (sa or sb or ()) if x] or [1.0]
        if len(oa) != len(ob) or any(abs(x - y) > tolerance * min(sizes) for x, y in zip(oa, ob)):
            out.append(f"origin {_fmt(oa)} vs {_fmt(ob)}")
    da, db = getattr(a, "direction", None), getattr(b, "direction", None)
    if da is not None and db is not None:
        if len(da) != len(db) or any(
            len(u) != len(v) or any(abs(x - y) > tolerance for x, y in zip(u, v)) for u, v in zip(da, db)
        ):
            out.append(f"direction {_fmt(da)} vs {_fmt(db)}")
    return out


def check_geometry(pred: Any, gt: Any, mask: Any = None, *, tolerance: float = TOLERANCE) -> None:
    """Raise :class:`InputError` when pred (or mask) and gt do not lie on the same grid."""
    for other, what in ((pred, "prediction"), (mask, "mask")):
        if other is None:
            continue
        diff = geometry_mismatch(other, gt, tolerance=tolerance)
        if diff:
            src_a = f" from its {other.geometry_source}" if getattr(other, "geometry_source", None) else ""
            src_b = f" from its {gt.geometry_source}" if getattr(gt, "geometry_source", None) else ""
            raise InputError(
                f"{what} {other.source}{src_a} and ground truth {gt.source}{src_b} do not lie on the same grid: "
                f"{'; '.join(diff)} ({what} vs ground truth; tolerance {tolerance:g}, relative to the voxel size). "
                f"Resample the {what} onto the ground truth's grid, or if the headers are wrong and the voxels "
                f"match, pass {option('geometry_check=False')}"
            )
