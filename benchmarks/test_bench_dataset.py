"""Group "dataset": a folder of NIfTI cases, fastseg-eval beside nnU-Net v2's evaluation loop.

Data: ``full``: 40 cases of 256**3 uint8 with 4 labels; ``small``: 8 cases of 96**3. Each case is
a pair from ``data.py``'s generator (seed 1000 + i), saved with nibabel as ``.nii.gz`` (gzip
level 1, nibabel's default) into the benchmark data directory once, with numpy's reference
counts beside it. Cases, each in a fresh child process (``dataset_runner.py``) with the same
number of processes or threads P (the CPUs available); the child imports first, and the parent
times from its request to the child's reply (imports are not timed for either side):

* ``fastseg-eval``: ``fse.evaluate_dataset(preds, gts, workers=P, num_classes=4)``: P threads,
  one case each at a time, each file gzip-decoded once and counted in one pass;
* ``nnU-Net loop (SimpleITK)``: ``compute_metrics_on_folder`` as nnunetv2 writes it: a spawn
  pool of P processes, each case loaded whole (SimpleITKIO, nnU-Net's default reader for
  ``.nii.gz``) as float32, then one boolean pass per foreground label. Needs SimpleITK (skipped
  without it);
* ``nnU-Net loop (nibabel)``: the same with nnU-Net's NibabelIO (``get_fdata()``, transposed).

Peak RSS: fastseg-eval's is its one process; the nnU-Net loop's is reported as the parent's plus
P times its largest pool process (``peak_rss_mib``), with both parts in the JSON. Both sides'
per-case counts are checked against the reference counts after timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fastseg_bench_data as bd
import numpy as np
import pytest

N_CASES, EDGE = {"full": (40, 256), "small": (8, 96)}[bd.bench_size()]
K = 4
SIZE = f"{N_CASES}x{EDGE}^3"
PROCS = bd.cpu_count()
RUNNER = Path(__file__).with_name("dataset_runner.py")
DATA_VERSION = 1


def ensure_nifti_dataset(n_cases: int, edge: int) -> dict:
    """``preds/`` and ``gts/`` of ``.nii.gz`` cases, made once; ``meta.json`` (written last) holds the
    reference confusion matrices."""
    import nibabel as nib

    root = bd.data_dir() / f"nifti-v{DATA_VERSION}-g{bd.GEN_VERSION}-{n_cases}x{edge}-K{K}"
    meta_path = root / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    for sub in ("preds", "gts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cms, stored = {}, 0
    for i in range(n_cases):
        case = f"case_{i:03d}"
        pred, gt, ref = bd.make_pair(bd.SegSpec((edge, edge, edge), num_classes=K, seed=1000 + i))
        for sub, a in (("preds", pred), ("gts", gt)):
            path = root / sub / f"{case}.nii.gz"
            nib.save(nib.Nifti1Image(a, np.eye(4)), str(path))
            stored += path.stat().st_size
        cms[case] = ref["cm"].tolist()
    meta = {
        "preds": str(root / "preds"), "gts": str(root / "gts"), "cases": n_cases, "edge": edge,
        "voxels": n_cases * edge**3, "stored_bytes": stored, "cm": cms,
    }  # fmt: skip
    meta_path.write_text(json.dumps(meta))
    return meta


@pytest.fixture(scope="module")
def dataset():
    pytest.importorskip("nibabel")
    return ensure_nifti_dataset(N_CASES, EDGE)


class _Child:
    def __init__(self, mode: str, meta: dict):
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), mode, meta["preds"], meta["gts"], str(PROCS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(bd.REPO),
        )  # fmt: skip
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
            raise RuntimeError(f"dataset runner {mode} did not start (exit {self.proc.wait()})")

    def go(self) -> str:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()  # the reply; the child's exit is not timed

    def finish(self, line: str) -> dict:
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        if not line:
            raise RuntimeError(f"dataset runner failed (exit {self.proc.returncode})")
        return json.loads(line)


CASES = [
    ("fastseg-eval", "fastseg"),
    ("nnU-Net loop (SimpleITK reader, its default)", "nnunet-sitk"),
    ("nnU-Net loop (nibabel reader)", "nnunet-nibabel"),
]


@pytest.mark.benchmark(group="dataset")
@pytest.mark.parametrize("case,mode", CASES, ids=[f"{m}-{SIZE}" for _, m in CASES])
def test_dataset(benchmark, dataset, warm_kernels, case, mode):
    if mode == "nnunet-sitk":
        pytest.importorskip("SimpleITK")
    runs: list[list] = []

    def setup():
        runs.append([_Child(mode, dataset), ""])
        return (runs[-1],), {}

    def run(slot):
        slot[1] = slot[0].go()

    benchmark.pedantic(run, setup=setup, rounds=bd.sizes()["rounds"], iterations=1, warmup_rounds=0)
    replies = [child.finish(line) for child, line in runs]
    last = replies[-1]
    if mode == "fastseg":
        peak = last["maxrss_mib"]
    else:
        peak = last["maxrss_mib"] + PROCS * last["children_maxrss_mib"]
    bd.annotate(
        benchmark, key=f"dataset.{mode}", case=case, size=SIZE, voxels=dataset["voxels"],
        workers=PROCS, cases=dataset["cases"], peak_rss_mib=round(peak, 1),
        parent_rss_mib=round(last["maxrss_mib"], 1), pool_process_rss_mib=round(last["children_maxrss_mib"], 1),
        stored_mib=round(dataset["stored_bytes"] / 2**20, 1), seconds_in_child=round(last["seconds"], 3),
    )  # fmt: skip
    for case_id, ref in dataset["cm"].items():
        ref = np.asarray(ref)
        got = last["result"][case_id]
        if mode == "fastseg":
            np.testing.assert_array_equal(np.asarray(got), ref)
        else:
            for lab in (1, 2, 3):
                tp = ref[lab, lab]
                fp, fn = ref[:, lab].sum() - tp, ref[lab].sum() - tp
                assert got[str(lab)] == [tp, fp, fn, ref.sum() - tp - fp - fn]
