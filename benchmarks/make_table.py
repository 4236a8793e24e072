"""Markdown tables from a pytest-benchmark JSON file of this suite.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/make_table.py bench.json [-o table.md]

Prints the machine (CPU model, cores, load average), library versions, one row per case
(median time, voxels per second, peak RSS) and the ratios the project targets, each with its
target, the measured value and whether it is met. Rows whose cases were not run say so.
Only the standard library is used, so the table can be made anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

GROUP_ORDER = ["kernel K=4", "kernel K=256", "kernel ids", "kernel ratios", "zarr", "zarr sparse", "scaling", "instances", "cli", "boundary", "dataset"]
GIB = 1024.0  # MiB


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _fmt_rate(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}vox/s"
    return f"{v:.0f} vox/s"


def _fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} MiB"


class Results:
    """The benchmarks of one JSON file, by the ``key`` their tests attach in ``extra_info``."""

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.rows = doc.get("benchmarks", [])
        self.by_key = {b["extra_info"]["key"]: b for b in self.rows if "key" in b.get("extra_info", {})}

    def median(self, key: str) -> float | None:
        b = self.by_key.get(key)
        return None if b is None else float(b["stats"]["median"])

    def rate(self, key: str) -> float | None:
        b = self.by_key.get(key)
        if b is None or not b["extra_info"].get("voxels"):
            return None
        return b["extra_info"]["voxels"] / float(b["stats"]["median"])

    def info(self, key: str, name: str) -> Any:
        b = self.by_key.get(key)
        return None if b is None else b["extra_info"].get(name)

    def instance_scaling_keys(self) -> list[str]:
        keys = [k for k in self.by_key if k.startswith("instances.scaling.")]
        return sorted(keys, key=lambda k: self.by_key[k]["extra_info"].get("voxels", 0))

    def scaling_keys(self) -> list[str]:
        keys = [k for k in self.by_key if k.startswith("scaling.")]
        return sorted(keys, key=lambda k: self.by_key[k]["extra_info"].get("voxels", 0))


# ------------------------------------------------------------------------------------ sections
def machine_section(res: Results) -> list[str]:
    mi = res.doc.get("machine_info", {})
    fb = mi.get("fastseg_bench", {})
    cpu = fb.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "?"
    cores = fb.get("cores_available")
    total = fb.get("cores_total")
    core_txt = f"{cores} cores available" + (f" (of {total})" if total and total != cores else "")
    vers = fb.get("versions", {})
    vtxt = ", ".join(f"{k} {v}" for k, v in vers.items() if v)
    load = f"{fb.get('loadavg_start')} at start, {fb.get('loadavg_end')} at end (1, 5, 15 min)"
    lines = [
        f"- Machine: {cpu}, {core_txt}, {fb.get('memory_gib', '?')} GiB RAM, {mi.get('system', '')} "
        f"{mi.get('release', '')}".rstrip(),
        f"- Load average: {load}",
        f"- Versions: {vtxt or mi.get('python_version', '?')}",
        f"- Size preset: `FASTSEG_BENCH_SIZE={fb.get('size', '?')}`; run {res.doc.get('datetime', '?')}",
    ]
    if fb.get("size") not in (None, "full"):
        lines.append("- Targets are defined for the full sizes; a reduced preset only shows the suite works.")
    return lines


def results_section(res: Results) -> list[str]:
    def order(b: dict[str, Any]) -> tuple[int, str, int]:
        g = b.get("group") or ""
        return (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g, 0)

    rows = sorted(res.rows, key=order)  # stable: keeps the run's order inside a group
    out = [
        "| group | case | size | median | voxels/s | peak RSS | rounds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for b in rows:
        ei = b.get("extra_info", {})
        med = float(b["stats"]["median"])
        rate = ei["voxels"] / med if ei.get("voxels") else None
        case = ei.get("case") or b.get("name", "?")
        size = ei.get("size", "")
        rss = ei.get("peak_rss_mib")
        out.append(
            f"| {b.get('group') or ''} | {case} | {size} | {_fmt_time(med)} | {_fmt_rate(rate)} | "
            f"{_fmt_mib(rss)} | {b['stats'].get('rounds', '')} |"
        )
    return out


def _row(
    check: str,
    target: str,
    measured: float | None,
    fmt: Callable[[float], str],
    ok: Callable[[float], bool],
    note: str = "",
) -> str:
    if measured is None or not math.isfinite(measured):
        return f"| {check} | {target} | not measured | - |"
    verdict = "met" if ok(measured) else "**not met**"
    return f"| {check} | {target} | {fmt(measured)}{(' ' + note) if note else ''} | {verdict} |"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets_section(res: Results) -> list[str]:
    x = lambda v: f"{v:.2f}x"  # noqa: E731
    out = ["| check | target | measured | result |", "| --- | --- | --- | --- |"]
    k4 = res.rate("kernel.k4.fse")
    out.append(
        _row(
            "kernel K=4: fastseg-eval vs numpy bincount (time ratio)",
            ">= 30x faster",
            _ratio(res.median("kernel.k4.numpy"), res.median("kernel.k4.fse")),
            x,
            lambda v: v >= 30,
        )
    )
    out.append(
        _row(
            "kernel: K=256 throughput / K=4 throughput",
            ">= 0.5",
            _ratio(res.rate("kernel.k256.fse"), k4),
            x,
            lambda v: v >= 0.5,
        )
    )
    out.append(
        _row(
            "kernel: large-label mode (uint16 ids, 65536 classes, diagonal + marginals) throughput / K=4",
            ">= 0.5",
            _ratio(res.rate("kernel.ids.fse"), k4),
            x,
            lambda v: v >= 0.5,
        )
    )
    rounds = res.info("kernel.ratios.alternated", "paired_rounds")
    for what, name in (("K=256", "k256_over_k4"), ("large-label mode (uint16 ids)", "ids_over_k4")):
        out.append(
            _row(
                f"kernel: {what} / K=4 throughput, the cases alternated call by call "
                f"(median of {rounds or '?'} paired ratios; the same target)",
                ">= 0.5",
                res.info("kernel.ratios.alternated", name),
                x,
                lambda v: v >= 0.5,
            )
        )
    for key, floor in (("zarr.evaluate.half", "zarr.raw_floor.half"), ("zarr.evaluate", "zarr.raw_floor")):
        out.append(
            _row(
                f"zarr {res.info(key, 'size') or '?'}: evaluate time / raw codec floor (chunk files + numcodecs zstd, same threads)",
                "<= 1.6",
                _ratio(res.median(key), res.median(floor)),
                x,
                lambda v: v <= 1.6,
            )
        )
    out.append(
        _row(
            "zarr: evaluate time / decode-only time (zarr-python)",
            "<= 1.25",
            _ratio(res.median("zarr.evaluate"), res.median("zarr.decode")),
            x,
            lambda v: v <= 1.25,
        )
    )
    out.append(
        _row(
            "zarr: dask idiom time / evaluate time",
            ">= 4",
            _ratio(res.median("zarr.dask"), res.median("zarr.evaluate")),
            x,
            lambda v: v >= 4,
        )
    )
    out.append(
        _row(
            f"sweep: 1000-bin threshold sweep / plain thresholded evaluation ({res.info('sweep.sweep', 'size') or '?'} float32 zarr)",
            "<= 2",
            _ratio(res.median("sweep.sweep"), res.median("sweep.plain")),
            x,
            lambda v: v <= 2,
        )
    )
    scal = res.scaling_keys()
    big_key = scal[-1] if scal else "zarr.evaluate"
    big = res.info(big_key, "peak_rss_mib")
    out.append(
        _row(
            f"memory: peak RSS of the end-to-end run at {res.info(big_key, 'size') or '?'}",
            "< 1 GiB",
            big,
            lambda v: f"{v:.0f} MiB",
            lambda v: v < GIB,
        )
    )
    if len(scal) >= 2:
        lo, hi = res.info(scal[0], "peak_rss_mib"), res.info(scal[-1], "peak_rss_mib")
        sizes = f"{res.info(scal[0], 'size')} -> {res.info(scal[-1], 'size')}"
        out.append(
            _row(
                f"memory flat: peak RSS {sizes} (ratio; volume grows "
                f"{res.info(scal[-1], 'voxels') / res.info(scal[0], 'voxels'):.0f}x)",
                "<= 1.25x",
                _ratio(hi, lo),
                x,
                lambda v: v <= 1.25,
                note=f"({lo:.0f} -> {hi:.0f} MiB)",
            )
        )
    else:
        out.append("| memory flat from the smallest to the largest volume | <= 1.25x | not measured | - |")
    out.append(
        _row(
            f"dataset {res.info('dataset.fastseg', 'size') or '?'} .nii.gz: nnU-Net's evaluation loop "
            "(SimpleITK reader) / fastseg-eval, same process count (time ratio)",
            ">= 3x",
            _ratio(res.median("dataset.nnunet-sitk"), res.median("dataset.fastseg")),
            x,
            lambda v: v >= 3,
        )
    )
    out.append(
        _row(
            f"instances: contingency table vs scikit-image contingency_table (throughput ratio, "
            f"{res.info('instances.fse', 'size') or '?'} uint64, {res.info('instances.fse', 'gt_ids') or '?'} gt ids)",
            ">= 20x",
            _ratio(res.rate("instances.fse"), res.rate("instances.skimage")),
            x,
            lambda v: v >= 20,
        )
    )
    out.append(
        _row(
            f"instances: contingency table throughput on {res.info('instances.fse', 'workers') or '?'} cores",
            ">= 1 Gvoxel/s",
            res.rate("instances.fse"),
            _fmt_rate,
            lambda v: v >= 1e9,
        )
    )
    iscal = res.instance_scaling_keys()
    if len(iscal) >= 2:
        lo, hi = res.info(iscal[0], "peak_rss_mib"), res.info(iscal[-1], "peak_rss_mib")
        sizes = f"{res.info(iscal[0], 'size')} -> {res.info(iscal[-1], 'size')}"
        out.append(
            _row(
                f"instances: peak RSS flat {sizes} at a fixed id count (ratio)",
                "<= 1.25x",
                _ratio(hi, lo),
                x,
                lambda v: v <= 1.25,
                note=f"({lo:.0f} -> {hi:.0f} MiB)",
            )
        )
    else:
        out.append("| instances: peak RSS flat at a fixed id count | <= 1.25x | not measured | - |")
    out.append(
        _row(
            "cli: warm-cache run wall time (process start to exit)",
            "< 2 s",
            res.median("cli.warm"),
            _fmt_time,
            lambda v: v < 2,
        )
    )
    refs = [r for r in (res.median("boundary.deepmind"), res.median("boundary.monai")) if r is not None]
    out.append(
        _row(
            f"boundary {res.info('boundary.fse', 'size') or '?'}, K=4, hd95+assd+nsd: faster of surface-distance "
            "and MONAI / fastseg-eval (time ratio)",
            ">= 10x faster",
            _ratio(min(refs), res.median("boundary.fse")) if refs else None,
            x,
            lambda v: v >= 10,
        )
    )
    out.append(
        _row(
            f"boundary zarr {res.info('boundary.zarr', 'size') or '?'}, K=4, hd95+assd+nsd, 2 workers: wall time",
            "<= 30 s",
            res.median("boundary.zarr"),
            _fmt_time,
            lambda v: v <= 30,
        )
    )
    out.append(
        _row(
            "boundary zarr: peak RSS",
            "< 1 GiB",
            res.info("boundary.zarr", "peak_rss_mib"),
            _fmt_mib,
            lambda v: v < GIB,
        )
    )
    return out


def info_section(res: Results) -> list[str]:
    """Ratios without a target that help read the results."""
    out = ["| quantity | value |", "| --- | --- |"]

    def add(name: str, v: float | None, fmt: Callable[[float], str]) -> None:
        out.append(f"| {name} | {'not measured' if v is None else fmt(v)} |")

    x = lambda v: f"{v:.2f}x"  # noqa: E731
    cold, warm = res.median("cli.cold"), res.median("cli.warm")
    add("cli: first run with an empty numba cache (cold)", cold, _fmt_time)
    add(
        "cli: numba compile time (cold - warm)",
        None if cold is None or warm is None else cold - warm,
        _fmt_time,
    )
    add(
        "kernel K=4: fastseg-eval / scikit-learn throughput",
        _ratio(res.rate("kernel.k4.fse"), res.rate("kernel.k4.sklearn")),
        x,
    )
    add(
        "kernel K=4: one thread / default threads throughput",
        _ratio(res.rate("kernel.k4.fse1"), res.rate("kernel.k4.fse")),
        x,
    )
    add(
        "kernel K=4: label discovery / num_classes throughput",
        _ratio(res.rate("kernel.k4.discovery"), res.rate("kernel.k4.fse")),
        x,
    )
    add(
        "kernel K=256: fastseg-eval vs numpy bincount (time ratio)",
        _ratio(res.median("kernel.k256.numpy"), res.median("kernel.k256.fse")),
        x,
    )
    add(
        "kernel ids: fastseg-eval accumulator vs numpy 3 bincounts (time ratio)",
        _ratio(res.median("kernel.ids.numpy"), res.median("kernel.ids.fse")),
        x,
    )
    add(
        "kernel ids: evaluate (discovery + every metric per id) / accumulator time",
        _ratio(res.median("kernel.ids.evaluate"), res.median("kernel.ids.fse")),
        x,
    )
    add(
        "distributed: LocalCluster (2 processes, already running) / local threads, same 512^3 pair",
        _ratio(res.median("distributed.local-cluster"), res.median("distributed.threads")),
        x,
    )
    add(
        "distributed: scheduler='local:2' including cluster start-up / local threads",
        _ratio(res.median("distributed.local:2"), res.median("distributed.threads")),
        x,
    )
    add(
        "dataset: nnU-Net's evaluation loop (nibabel reader) / fastseg-eval (time ratio)",
        _ratio(res.median("dataset.nnunet-nibabel"), res.median("dataset.fastseg")),
        x,
    )
    add(
        "dataset: peak RSS, nnU-Net loop (SimpleITK; parent + P pool processes) / fastseg-eval",
        _ratio(res.info("dataset.nnunet-sitk", "peak_rss_mib"), res.info("dataset.fastseg", "peak_rss_mib")),
        x,
    )
    add("zarr: decode-only throughput (zarr-python)", res.rate("zarr.decode"), _fmt_rate)
    add(
        "zarr sparse (unstored chunks): old fill-and-count path / evaluate (time ratio)",
        _ratio(res.median("zarr_sparse.evaluate_filled"), res.median("zarr_sparse.evaluate")),
        x,
    )
    add(
        "zarr sparse: evaluate / raw codec floor of the stored chunks (time ratio)",
        _ratio(res.median("zarr_sparse.evaluate"), res.median("zarr_sparse.raw_floor")),
        x,
    )
    add("zarr: decode-only throughput (fastseg chunk reader)", res.rate("zarr.decode_fast"), _fmt_rate)
    add(
        "zarr: evaluate time / decode-only time with the same reader (what counting adds)",
        _ratio(res.median("zarr.evaluate"), res.median("zarr.decode_fast")),
        x,
    )
    add(
        "instances: contingency one thread / default threads throughput",
        _ratio(res.rate("instances.fse1"), res.rate("instances.fse")),
        x,
    )
    add(
        "instances: evaluate(instances=True) time / contingency time",
        _ratio(res.median("instances.evaluate"), res.median("instances.fse")),
        x,
    )
    for k in res.instance_scaling_keys():
        b = res.by_key[k]
        out.append(
            f"| instances {b['extra_info']['size']} (zarr): time per voxel, peak / baseline RSS | "
            f"{float(b['stats']['median']) / b['extra_info']['voxels'] * 1e9:.2f} ns, "
            f"{b['extra_info'].get('peak_rss_mib', 0):.0f} / {b['extra_info'].get('baseline_rss_mib', 0):.0f} MiB |"
        )
    for k in res.scaling_keys():
        b = res.by_key[k]
        ns = float(b["stats"]["median"]) / b["extra_info"]["voxels"] * 1e9
        out.append(
            f"| scaling {b['extra_info']['size']}: time per voxel, peak / baseline RSS | {ns:.2f} ns, "
            f"{b['extra_info'].get('peak_rss_mib', 0):.0f} / {b['extra_info'].get('baseline_rss_mib', 0):.0f} MiB |"
        )
    return out


def render(doc: dict[str, Any]) -> str:
    res = Results(doc)
    parts = [
        "### Machine",
        "",
        *machine_section(res),
        "",
        "### Targets",
        "",
        *targets_section(res),
        "",
        "### Results (median of the timed rounds)",
        "",
        *results_section(res),
        "",
        "### Derived",
        "",
        *info_section(res),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="file written by pytest --benchmark-json=FILE")
    ap.add_argument("-o", "--output", help="write the markdown here as well as to stdout")
    args = ap.parse_args(argv)
    with open(args.json, encoding="utf-8") as fh:
        doc = json.load(fh)
    text = render(doc)
    sys.stdout.write(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
