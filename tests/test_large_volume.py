"""A volume of more than 2**32 voxels counts exactly, with memory bounded by chunks, not volume size.

Two zarr arrays of 1024 x 2048 x 2049 uint8 voxels (4.3e9, more than 2**32) where only a few chunks
are written: every other chunk reads as fill_value without I/O. The expected matrix is computed
here from the boxes that were written (box intersections), not by reading the volume back.
The run happens in a subprocess whose peak RSS growth must stay below a generous bound.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

SHAPE = (1024, 2048, 2049)
CHUNKS = (64, 512, 2049)  # 64 MiB of uint8 per chunk, 64 chunks per array
IGNORE = 255
WORKERS = 2
RSS_BOUND = int(1.5 * 2**30)

# (label, box) written into each volume; boxes of one volume do not overlap each other
GT_BOXES = [
    (1, ((10, 20), (100, 110), (2000, 2049))),
    (2, ((60, 70), (500, 520), (0, 30))),  # straddles chunk borders on axes 0 and 1 (4 chunks)
    (IGNORE, ((500, 510), (1000, 1010), (1000, 1010))),
    (2, ((1020, 1024), (2040, 2048), (2045, 2049))),  # the far corner of the volume
]
PRED_BOXES = [
    (1, ((15, 25), (105, 115), (2040, 2049))),  # overlaps the first gt box
    (2, ((1000, 1024), (2040, 2048), (2000, 2049))),  # contains the corner gt box
    (1, ((62, 66), (510, 515), (20, 40))),  # straddles; overlaps the gt box of label 2
    (2, ((505, 506), (1005, 1006), (0, 2049))),  # crosses the ignored box
]


def _vol(box) -> int:
    return math.prod(max(0, b - a) for a, b in box)


def _inter(b1, b2):
    return tuple((max(a1, a2), min(e1, e2)) for (a1, e1), (a2, e2) in zip(b1, b2))


def expected_counts(shape=SHAPE, gt_boxes=GT_BOXES, pred_boxes=PRED_BOXES):
    """The 3 x 3 matrix (labels 0, 1, 2), ignored voxels and counted voxels, by box arithmetic."""
    n = math.prod(shape)
    cm = [[0] * 3 for _ in range(3)]
    ignored = sum(_vol(b) for lab, b in gt_boxes if lab == IGNORE)
    # voxels inside a gt box: split by the pred boxes they meet, the rest predicted 0
    for g, gb in gt_boxes:
        if g == IGNORE:
            continue
        rest = _vol(gb)
        for p, pb in pred_boxes:
            v = _vol(_inter(gb, pb))
            cm[g][p] += v
            rest -= v
        cm[g][0] += rest
    # voxels of gt 0 predicted p: pred box minus its parts inside any gt box (ignored ones too)
    for p, pb in pred_boxes:
        cm[0][p] += _vol(pb) - sum(_vol(_inter(pb, gb)) for _, gb in gt_boxes)
    counted = n - ignored
    cm[0][0] = counted - sum(cm[i][j] for i, j in itertools.product(range(3), range(3)) if (i, j) != (0, 0))
    return cm, ignored, counted


def _write(path, boxes):
    arr = zarr.create_array(store=str(path), shape=SHAPE, chunks=CHUNKS, dtype="uint8", fill_value=0)
    for lab, box in boxes:
        arr[tuple(slice(a, b) for a, b in box)] = lab
    return arr


SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, psutil
    import fastseg_eval as fse

    pred_path, gt_path, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # load / compile the kernels on a tiny volume first, so compilation is not measured
    tiny = np.zeros((2, 2, 2), dtype=np.uint8)
    fse.evaluate(tiny, tiny, num_classes=3, ignore_label=255, workers=workers)
    # the peak of this run only: reset the high-water mark the imports and the warm-up left
    # (a compilation there can pass 1 GiB for a moment), where Linux allows it (clear_refs 5)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    res = fse.evaluate(pred_path, gt_path, num_classes=3, ignore_label=255, workers=workers)
    seconds = time.perf_counter() - t0
    if reset:
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024  # kB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({
        "cm": res.confusion_matrix.tolist(), "labels": [int(x) for x in res.labels],
        "n_voxels": res.n_voxels, "n_ignored": res.n_ignored, "per_class": res.per_class,
        "rss0": rss0, "peak": peak, "seconds": seconds, "timing": res.timing,
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and sparse files as on Linux")
def test_more_than_2_32_voxels_exact_and_bounded(tmp_path):
    n = math.prod(SHAPE)
    assert n > 2**32
    _write(tmp_path / "gt.zarr", GT_BOXES)
    _write(tmp_path / "pred.zarr", PRED_BOXES)
    written = sum(1 for p in (tmp_path / "gt.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert written < 10  # almost every chunk is unwritten and reads as fill_value

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "pred.zarr"), str(tmp_path / "gt.zarr"), str(WORKERS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    cm, ignored, counted = expected_counts()
    assert out["labels"] == [0, 1, 2]
    assert out["cm"] == cm
    assert out["n_ignored"] == ignored
    assert out["n_voxels"] == counted > 2**32
    assert sum(map(sum, out["cm"])) == counted
    assert cm[0][0] > 2**32  # one cell past what 32 bits hold
    # per-class TN is counted - TP - FP - FN: beyond 2**32, exact
    for k in range(3):
        row = sum(cm[k])
        col = sum(cm[i][k] for i in range(3))
        assert out["per_class"][str(k)]["tn"] == counted - row - col + cm[k][k]
    assert out["timing"]["chunks_decoded"] == out["timing"]["chunks_total"] == {"pred": 64, "gt": 64}

    growth = out["peak"] - out["rss0"]
    print(f"\n{n} voxels in {out['seconds']:.1f} s; peak RSS growth {growth / 2**20:.0f} MiB")
    assert growth < RSS_BOUND, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)"
    )


def test_expected_counts_arithmetic_on_a_small_copy():
    """The box arithmetic above, checked against numpy bincount on the same boxes scaled down."""
    small = (64, 64, 64)
    scale = [s / b for s, b in zip(small, SHAPE)]

    def shrink(boxes):
        return [
            (lab, tuple((int(a * f), max(int(a * f) + 1, int(b * f))) for (a, b), f in zip(box, scale)))
            for lab, box in boxes
        ]

    gtb, pdb = shrink(GT_BOXES), shrink(PRED_BOXES)
    gt = np.zeros(small, dtype=np.uint8)
    pred = np.zeros(small, dtype=np.uint8)
    for lab, box in gtb:
        assert not gt[tuple(slice(a, b) for a, b in box)].any()  # boxes stay disjoint
        gt[tuple(slice(a, b) for a, b in box)] = lab
    for lab, box in pdb:
        pred[tuple(slice(a, b) for a, b in box)] = lab
    keep = gt != IGNORE
    ref = np.bincount(gt[keep].astype(np.int64) * 3 + pred[keep], minlength=9).reshape(3, 3)
    cm, ignored, counted = expected_counts(small, gtb, pdb)
    assert cm == ref.tolist()
    assert ignored == int((~keep).sum()) and counted == int(keep.sum())
    # and the full-size boxes exercise every kind of cell (no trivial answer)
    full, _, _ = expected_counts()
    assert all(full[i][j] > 0 for i, j in ((1, 1), (2, 2), (2, 1), (0, 1), (0, 2), (1, 0), (2, 0)))
