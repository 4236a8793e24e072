"""Child process of the ``dataset`` benchmark: evaluates a folder of NIfTI cases once, when told to.

``python dataset_runner.py MODE PRED_DIR GT_DIR PROCESSES``. It imports what the mode needs
(and, for fastseg-eval, loads its compiled kernels), prints ``ready``, waits for one line on
stdin, runs, and prints one JSON line: the per-case counts (checked by the parent against
numpy's reference counts), its own peak RSS, and the largest peak RSS of its child processes.
The parent times from its request to this reply, so imports are not timed for either side.

Modes:

* ``fastseg``: ``fse.evaluate_dataset(PRED_DIR, GT_DIR, workers=P, num_classes=4)`` (threads);
* ``nnunet-sitk`` / ``nnunet-nibabel``: nnU-Net v2's ``compute_metrics_on_folder`` loop, re-implemented
  faithfully from nnunetv2/evaluation/evaluate_predictions.py: a ``spawn`` pool of P processes,
  one case per task; each loads both files whole with nnU-Net's reader (``SimpleITKIO``, its
  default for ``.nii.gz``, or ``NibabelIO``: ``get_fdata()``, transposed) as float32, then makes
  one boolean pass per label (``==``, then four masked sums), as nnU-Net does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

LABELS = [1, 2, 3]


# ------------------------------------------------------------------ nnU-Net v2, faithfully
class SimpleITKIO:
    def read_seg(self, f):
        import SimpleITK as sitk

        img = sitk.ReadImage(f)
        npy = sitk.GetArrayFromImage(img)[None]
        return np.vstack([npy], dtype=np.float32, casting="unsafe"), {"spacing": list(img.GetSpacing())[::-1]}


class NibabelIO:
    def read_seg(self, f):
        import nibabel

        img = nibabel.load(f)
        return np.vstack([img.get_fdata().transpose((2, 1, 0))[None]], dtype=np.float32, casting="unsafe"), {}


def region_or_label_to_mask(segmentation, region_or_label):
    if np.isscalar(region_or_label):
        return segmentation == region_or_label
    mask = np.zeros_like(segmentation, dtype=bool)
    for r in region_or_label:
        mask[segmentation == r] = True
    return mask


def compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore_mask=None):
    use_mask = np.ones_like(mask_ref, dtype=bool) if ignore_mask is None else ~ignore_mask
    tp = np.sum((mask_ref & mask_pred) & use_mask)
    fp = np.sum(((~mask_ref) & mask_pred) & use_mask)
    fn = np.sum((mask_ref & (~mask_pred)) & use_mask)
    tn = np.sum(((~mask_ref) & (~mask_pred)) & use_mask)
    return tp, fp, fn, tn


def compute_metrics(reference_file, prediction_file, image_reader_writer, labels_or_regions, ignore_label=None):
    seg_ref, _ = image_reader_writer.read_seg(reference_file)
    seg_pred, _ = image_reader_writer.read_seg(prediction_file)
    ignore_mask = seg_ref == ignore_label if ignore_label is not None else None
    results = {"reference_file": reference_file, "prediction_file": prediction_file, "metrics": {}}
    for r in labels_or_regions:
        m = results["metrics"][r] = {}
        tp, fp, fn, tn = compute_tp_fp_fn_tn(
            region_or_label_to_mask(seg_ref, r), region_or_label_to_mask(seg_pred, r), ignore_mask
        )
        if tp + fp + fn == 0:
            m["Dice"] = m["IoU"] = np.nan
        else:
            m["Dice"] = 2 * tp / (2 * tp + fp + fn)
            m["IoU"] = tp / (tp + fp + fn)
        m["FP"], m["TP"], m["FN"], m["TN"] = fp, tp, fn, tn
        m["n_pred"], m["n_ref"] = fp + tp, fn + tp
    return results


def compute_metrics_on_folder(folder_ref, folder_pred, reader, file_ending, labels, num_processes):
    files_pred = sorted(f for f in os.listdir(folder_pred) if f.endswith(file_ending))
    files_ref = [os.path.join(folder_ref, i) for i in files_pred]
    files_pred = [os.path.join(folder_pred, i) for i in files_pred]
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        results = pool.starmap(
            compute_metrics,
            list(zip(files_ref, files_pred, [reader] * len(files_pred), [labels] * len(files_pred),
                     [None] * len(files_pred))),  # fmt: skip
        )
    means = {r: {m: np.nanmean([i["metrics"][r][m] for i in results]) for m in results[0]["metrics"][r]} for r in labels}
    return results, means


# ------------------------------------------------------------------ the runner
def _vmhwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prepare(mode: str):
    if mode == "fastseg":
        import tempfile

        import nibabel

        import fastseg_eval as fse

        a = np.zeros((4, 4, 4), np.uint8)
        a[1] = 1
        with tempfile.TemporaryDirectory() as tmp:  # loads the kernels and the NIfTI reader
            for sub in ("p", "g"):
                os.mkdir(os.path.join(tmp, sub))
                nibabel.save(nibabel.Nifti1Image(a, np.eye(4)), os.path.join(tmp, sub, "c.nii.gz"))
            fse.evaluate_dataset(os.path.join(tmp, "p"), os.path.join(tmp, "g"), workers=2, num_classes=4)

        def run(pred_dir, gt_dir, procs):
            ds = fse.evaluate_dataset(pred_dir, gt_dir, workers=procs, num_classes=4, metrics=["dice", "iou"])
            return {c.case: c.confusion_matrix.tolist() for c in ds.per_case}

        return run
    reader = SimpleITKIO() if mode == "nnunet-sitk" else NibabelIO()
    reader.read_seg  # noqa: B018 - the reader module is imported inside the pool's processes, as nnU-Net's

    def run(pred_dir, gt_dir, procs):
        results, _ = compute_metrics_on_folder(gt_dir, pred_dir, reader, ".nii.gz", LABELS, procs)
        out = {}
        for r in results:
            case = os.path.basename(r["prediction_file"])[: -len(".nii.gz")]
            out[case] = {str(k): [int(v[x]) for x in ("TP", "FP", "FN", "TN")] for k, v in r["metrics"].items()}
        return out

    return run


def main() -> None:
    mode, pred_dir, gt_dir, procs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    run = _prepare(mode)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    result = run(pred_dir, gt_dir, procs)
    seconds = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"result": result, "seconds": seconds, "maxrss_mib": _vmhwm_mib(), "children_maxrss_mib": kids}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
