"""The command line: ``fastseg-eval PRED GT [options]`` and ``fastseg-eval demo DIR``.

A thin shell over :func:`fastseg_eval.evaluate`: parse options, run, write the report. Exit
codes: 0 ok; 1 bad data or a runtime failure (one line on stderr, no traceback unless
``--debug``); 2 a usage error (unknown option or option value, an output path inside an input);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Outputs are written atomically
(:mod:`fastseg_eval.io.outputs`): an interrupted or failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from fastseg_eval._version import __version__

PROG = "fastseg-eval"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FORMATS = ("table", "json", "csv")
FORMAT_BY_EXTENSION = {".json": "json", ".csv": "csv", ".txt": "table"}
MATRIX_EXTENSIONS = (".npy", ".csv")
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
PROGRESS_DELAY_ENV = "FASTSEG_EVAL_PROGRESS_DELAY"
"""Seconds before the progress bar appears (default 1)."""


class UsageError(Exception):
    """A command-line usage problem: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage block
        raise UsageError(message)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._bare_optional_values_last(args), namespace)

    def _bare_optional_values_last(self, args: list[str]) -> list[str]:
        """``--sweep PRED GT``: a flag whose value may be left out takes the next word only if it is
        a number; otherwise the flag moves, bare, to the end (before ``--``), so PRED stays PRED."""
        longs = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        optional = {s for a in self._actions if a.nargs == "?" for s in a.option_strings}

        def flag_of(word: str) -> str | None:
            if word in optional:
                return word
            hits = [s for s in longs if s.startswith(word)] if word.startswith("--") and len(word) > 2 else []
            return hits[0] if self.allow_abbrev and len(hits) == 1 and hits[0] in optional else None

        end = args.index("--") if "--" in args else len(args)
        kept, moved = [], []
        for i, word in enumerate(args[:end]):
            nxt = args[i + 1] if i + 1 < end else None
            if nxt is not None and not nxt.startswith("-") and flag_of(word) and not _is_number(nxt):
                moved.append(word)
            else:
                kept.append(word)
        return kept + moved + args[end:]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def option_flag(name: str) -> str | None:
    """The flag that sets :func:`fastseg_eval.evaluate`'s parameter ``name`` (``num_classes`` ->
    ``--num-classes``, ``thresholds`` -> ``--sweep``), or None when no flag does."""
    return _option_flags().get(name)


_DEST_OF_PARAMETER = {"thresholds": "sweep"}
"""evaluate()'s parameters whose option has another name (``thresholds=B`` is ``--sweep B``)."""


@functools.lru_cache(maxsize=1)
def _option_flags() -> dict[str, str]:
    flags: dict[str, str] = {}
    for action in build_parser()._actions:  # each option's dest, spelled as its first long flag
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in flags:
            flags[action.dest] = longs[0]
    flags.update({p: flags[d] for p, d in _DEST_OF_PARAMETER.items() if d in flags})
    for action in build_parser()._actions:  # option("geometry_check=False") reads --no-geometry-check
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings:
            flags.setdefault(f"{action.dest}=False", action.option_strings[-1])
    return flags


@contextlib.contextmanager
def _flags_in_errors() -> Iterator[None]:
    """Errors raised inside name the options a command-line user types (``--num-classes 3``)."""
    from fastseg_eval.errors import FastSegError

    try:
        yield
    except FastSegError as e:
        e.args = (e.spell(option_flag), *e.args[1:])
        raise


def _flag_spelling(text: str) -> str:
    """A warning's text with its options named as flags."""
    from fastseg_eval.errors import Message

    return text.spell(option_flag) if isinstance(text, Message) else text


# ---------------------------------------------------------------------- option value parsers
def _label_list(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3,7"`` -> a list of labels."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a label or a range a-b (expected e.g. 0,1,2 or 0-3)"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("no label given (expected e.g. 0,1,2)")
    return out


def _label_names(text: str) -> dict[int, str]:
    """``"1=liver,2=tumour"``, or a JSON file of names.

    The file holds ``{"1": "liver"}``, its inverse ``{"liver": 1}``, a list indexed by label, or a
    dataset description whose ``"labels"`` is one of these: nnU-Net's ``dataset.json``
    (``{"labels": {"background": 0, "liver": 1}}``) or the Medical Segmentation Decathlon's
    (``{"labels": {"0": "background", "1": "liver"}}``). An nnU-Net region of several labels
    (``"whole tumor": [1, 2, 3]``) names no single label and is skipped; a one-label region
    (``[3]``, which nnU-Net reads as ``3``) names that label unless a plain entry already does.
    """
    if text.lower().endswith(".json") or os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"cannot read label names from {text}: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("labels"), (dict, list)):
            data = data["labels"]  # nnU-Net / MSD dataset.json
        if isinstance(data, list):
            data = {i: name for i, name in enumerate(data) if name is not None}
        if not isinstance(data, dict):
            raise argparse.ArgumentTypeError(
                f'{text} must hold a JSON object {{"1": "liver", ...}} or {{"liver": 1, ...}}, a list of '
                'names, or a dataset.json with "labels"'
            )
        return _names_from_json(text, data)
    items = []
    for part in (p for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not LABEL=NAME (expected e.g. 1=liver,2=tumour, or a .json file)"
            )
        items.append(tuple(s.strip() for s in part.split("=", 1)))
    out: dict[int, str] = {}
    for k, v in items:
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"label {k!r} in --label-names is not an integer") from None
    return out


def _names_from_json(path: str, data: dict[Any, Any]) -> dict[int, str]:
    """Label -> name from a JSON object keyed either way (``{"1": "liver"}`` or ``{"liver": 1}``)."""

    def as_label(x: Any) -> int | None:
        if isinstance(x, int) and not isinstance(x, bool):
            return x
        if isinstance(x, str) and x.strip().lstrip("-").isdigit():
            return int(x)
        return None

    named: dict[int, str] = {}
    by_name: dict[int, str] = {}  # from {"name": label}; a plain entry wins over a one-label region
    for k, v in data.items():
        if isinstance(v, list) and len(v) == 1 and as_label(v[0]) is not None and not isinstance(v[0], str):
            v, region = v[0], True  # nnU-Net: [3] is label 3
        else:
            region = False
        if isinstance(v, (list, dict)):
            continue  # a region of several labels (nnU-Net): no single label to name
        label_key, label_value = as_label(k), (v if isinstance(v, int) and not isinstance(v, bool) else None)
        if label_key is not None and label_value is None and v is not None:
            named[label_key] = str(v)
        elif label_key is None and label_value is not None:
            if region:
                by_name.setdefault(label_value, str(k))
            else:
                named.setdefault(label_value, str(k))
        else:
            raise argparse.ArgumentTypeError(
                f"{path}: cannot tell the label from the name in {json.dumps(k)}: {json.dumps(v)} "
                '(expected "1": "liver" or "liver": 1)'
            )
    return dict(sorted({**by_name, **named}.items()))


def _storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (true, 3, {...}), else kept as text."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. anon=true)")
    key, value = (s.strip() for s in text.split("=", 1))
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _spacing(text: str) -> tuple[float, ...]:
    """``"0.8,0.8,3"`` (z, y, x) or one number for all axes."""
    try:
        vals = tuple(float(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        vals = ()
    if len(vals) not in (1, 3) or not all(v > 0 and v < float("inf") for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected Z,Y,X (e.g. 0.8,0.8,3) or one positive number")
    return vals * 3 if len(vals) == 1 else vals


def _level(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


# ---------------------------------------------------------------------- parsers
def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fastseg-eval PRED GT [options]``."""
    p = _Parser(
        prog=PROG,
        description=(
            "Confusion matrix and segmentation metrics of a prediction against ground truth, in one "
            "pass over zarr (v2/v3, groups, OME-Zarr, .zip, fsspec URLs). PRED comes first, GT second."
        ),
        epilog=(
            "Try it without data: `fastseg-eval demo /tmp/fse-demo` writes an example pair and prints "
            "the command to evaluate it.  Exit codes: 0 ok, 1 bad data or runtime error, "
            "2 usage error, 130 interrupted (143 on SIGTERM)."
        ),
    )
    p.add_argument(
        "pred", metavar="PRED", nargs="?",
        help="prediction: zarr store, node path, .zip store, URL, or a file (.nii.gz, .nii, .tif, .npy, .h5, "
        ".nrrd, .mha); or a folder of cases (see 'datasets')",
    )  # fmt: skip
    p.add_argument(
        "gt", metavar="GT", nargs="?", help="ground truth: as PRED (a folder of cases when PRED is one)"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    g = p.add_argument_group("inputs")
    g.add_argument("--pred-key", metavar="PATH", help="array inside the PRED store (e.g. labels/cells/0)")
    g.add_argument("--gt-key", metavar="PATH", help="array inside the GT store")
    g.add_argument("--mask", metavar="PATH", help="count only voxels where this volume is nonzero")
    g.add_argument("--mask-key", metavar="PATH", help="array inside the mask store")
    g.add_argument(
        "--level", type=_level, metavar="N",
        help="OME-Zarr multiscale level (index or dataset path; default: full resolution)",
    )  # fmt: skip
    g.add_argument(
        "--storage-option", dest="storage_options", action="append", type=_storage_option, default=[],
        metavar="KEY=VALUE", help="fsspec option for URLs, repeatable (VALUE read as JSON if it parses)",
    )  # fmt: skip

    g.add_argument(
        "--no-geometry-check", dest="geometry_check", action="store_false",
        help="do not compare the inputs' spacing / origin / direction (NIfTI, ITK, TIFF, HDF5 headers)",
    )  # fmt: skip

    g = p.add_argument_group(
        "datasets", "PRED_DIR GT_DIR (two folders of cases, matched by case id = file name without its "
        "format suffix) or --cases MANIFEST: per-case results, mean +- std over cases, the pooled result",
    )  # fmt: skip
    g.add_argument("--cases", metavar="CSV", help="manifest of cases instead of PRED GT: columns case,pred,gt[,mask]")
    g.add_argument(
        "--missing", choices=("error", "skip", "empty"), default="error",
        help="cases without a partner: error (default), skip them, or empty (an absent prediction is all background)",
    )  # fmt: skip
    g.add_argument(
        "--regions", metavar="L,..;L,..", help='merged labels reported beside the labels, e.g. "1,2,3;2,3;3"'
    )
    g.add_argument(
        "--nnunet-summary", metavar="FILE", help="also write nnU-Net v2's summary.json (its layout and definitions)"
    )
    g.add_argument(
        "--resume", metavar="JOURNAL",
        help="journal of finished cases (JSON lines): a rerun with the same journal skips them",
    )  # fmt: skip
    g.add_argument(
        "--on-error", choices=("stop", "skip"), default="stop",
        help="a case that cannot be read: stop (default), or skip it, list it in the report and exit 1",
    )  # fmt: skip

    g = p.add_argument_group("labels")
    g.add_argument("-n", "--num-classes", type=_positive_int, metavar="K", help="labels are 0..K-1")
    g.add_argument("--labels", type=_label_list, metavar="L,...", help="the labels, e.g. 0,1,2 or 0-3")
    g.add_argument(
        "--label-names", type=_label_names, metavar="L=NAME,...|FILE.json",
        help='names shown beside labels, e.g. 1=liver,2=tumour, or a JSON file ({"1": "liver"}, '
        '{"liver": 1}, a list, or an nnU-Net / MSD dataset.json)',
    )  # fmt: skip
    g.add_argument(
        "--ignore-label", type=int, metavar="L", help="ground-truth label whose voxels are skipped"
    )
    bg = g.add_mutually_exclusive_group()
    bg.add_argument(
        "--background-label", type=int, default=0, metavar="L",
        help="label left out of the foreground mean and micro average (default 0)",
    )  # fmt: skip
    bg.add_argument(
        "--no-background", dest="background_label", action="store_const", const=None,
        help="no background label: every label counts in every mean",
    )  # fmt: skip

    g = p.add_argument_group("probability maps")
    g.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="PRED is a binary probability map: label 1 where p > T (default 0.5 with --sweep)",
    )
    g.add_argument(
        "--channel-axis",
        type=int,
        metavar="AXIS",
        help="PRED holds one probability per class along AXIS: label = argmax",
    )
    g.add_argument(
        "--prob-scale",
        type=float,
        metavar="S",
        help="PRED stores integers meaning value / S (e.g. 255 for uint8 maps)",
    )
    g.add_argument(
        "--sweep", type=_positive_int, nargs="?", const=True, metavar="B",
        help="also sweep the threshold in the same pass with B bins (default 1000): ROC AUC, average "
        "precision, best Dice / IoU threshold",
    )  # fmt: skip

    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics", metavar="NAME,...",
        help="metrics to report, names or aliases (dice,iou,recall,...) or 'all' (default: all)",
    )  # fmt: skip
    g.add_argument(
        "--empty",
        choices=("nan", "zero", "one"),
        default="nan",
        help="value of a metric with a zero denominator (default nan; means skip NaN)",
    )
    g.add_argument("--tversky-alpha", type=float, default=0.5, metavar="A", help="weight of FP (default 0.5)")
    g.add_argument("--tversky-beta", type=float, default=0.5, metavar="B", help="weight of FN (default 0.5)")
    g.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="EPS",
        help="added to numerator and denominator of dice, iou, tversky (default 0)",
    )
    g.add_argument(
        "--spacing", type=_spacing, metavar="Z,Y,X",
        help="voxel size for the boundary metrics (hd, hd95, assd, masd, nsd), e.g. 0.8,0.8,3 or 1.5 "
        "(default: from the inputs' NIfTI header or OME-Zarr scale, else 1)",
    )  # fmt: skip
    g.add_argument(
        "--surface", choices=("deepmind", "monai", "medpy"), default="deepmind",
        help="boundary metric convention: DeepMind surface-distance surfels (default), MONAI or MedPy",
    )  # fmt: skip
    g.add_argument(
        "--hd-percentile", type=float, default=95.0, metavar="P", help="percentile of hd95 (default 95)"
    )
    g.add_argument(
        "--nsd-tolerance", type=float, default=1.0, metavar="T",
        help="tolerance of nsd in physical units (default 1)",
    )  # fmt: skip
    g.add_argument(
        "--empty-distance", type=float, metavar="D",
        help="boundary distance reported for a label present in one volume only (default: inf, null in JSON)",
    )  # fmt: skip

    g = p.add_argument_group("instances")
    g.add_argument(
        "--instances", action="store_true",
        help="also instance metrics from the sparse (gt id, pred id) table, same pass: VOI split / merge, "
        "adapted Rand error, matching at IoU > T, instance precision / recall / F1, PQ = SQ x RQ, one row per "
        "gt instance (--background-label is left out of matching; --no-background: every id is an instance)",
    )  # fmt: skip
    g.add_argument(
        "--iou-threshold", type=float, default=0.5, metavar="T",
        help="instances match when IoU > T (default 0.5: unique; below 0.5 greedy, highest IoU first)",
    )  # fmt: skip
    g.add_argument(
        "--connectivity", type=int, nargs="?", const=26, choices=(4, 6, 8, 18, 26), metavar="6|18|26",
        help="PRED and GT are semantic masks: label each class's connected components as instances first "
        "(26 without a value; 4 / 8 in 2-D); reads the volumes into memory, needs connected-components-3d",
    )  # fmt: skip
    g.add_argument(
        "--instances-csv", metavar="FILE",
        help="write the per-instance table (id, matched_id, iou, dice, size: every gt instance) as CSV "
        "(datasets: every case's rows, with a leading case column)",
    )  # fmt: skip

    g = p.add_argument_group("compute")
    g.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto", help="(default auto)")
    g.add_argument("--workers", type=_positive_int, metavar="N", help="threads (default: CPUs available)")
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run as a dask graph: a scheduler name or dask.distributed address (tcp://...)",
    )
    g.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="memory budget for the label space, e.g. 8G (default: $FASTSEG_MEMORY_LIMIT, else half the "
        "available memory); a --num-classes / --labels that cannot fit is refused before counting",
    )

    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, help="report format (default table, or from -o's extension)")
    g.add_argument("-o", "--output", metavar="FILE", help="write the report here (.json, .csv or .txt)")
    g.add_argument(
        "--save-matrix", metavar="FILE", help="raw int64 confusion matrix, rows = gt (.npy or .csv)"
    )
    g.add_argument(
        "--plot",
        metavar="FILE",
        help="confusion heatmap + per-class bars (.png/.pdf/.svg; "
        "needs matplotlib: pip install 'fastseg-eval[plot]')",
    )
    g.add_argument(
        "--max-rows",
        type=_nonneg_int,
        default=50,
        metavar="N",
        help="table: at most N class rows, the largest (default 50; 0 = all)",
    )
    g.add_argument(
        "--per-class-limit",
        type=_nonneg_int,
        default=10_000,
        metavar="N",
        help="JSON / CSV: list at most N labels one by one, those that occur, largest first "
        "(default 10000; 0 = every label); means and overall figures always cover all",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar; with -o, nothing on stdout")
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show tracebacks and log decisions")
    return p


def build_demo_parser() -> argparse.ArgumentParser:
    """The parser of ``fastseg-eval demo DIR`` (also ``fastseg-eval --demo DIR``)."""
    p = _Parser(
        prog=f"{PROG} demo",
        description="Write a small synthetic pair DIR/pred.zarr and DIR/gt.zarr and print the command "
        "that evaluates it.",
    )
    p.add_argument("directory", metavar="DIR", nargs="?", help="where to write pred.zarr and gt.zarr")
    p.add_argument("--demo", dest="demo_dir", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="96", metavar="N|Z,Y,X", help="volume shape (default 96 = 96x96x96)")
    p.add_argument("--classes", type=int, default=4, metavar="K", help="labels 0..K-1 (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3, help="(default 3)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------- helpers
def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def use_color() -> bool:
    """ANSI colour on stdout: only on a terminal, never with NO_COLOR set or TERM=dumb."""
    return _stdout_is_tty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _table_width() -> int:
    if not _stdout_is_tty():
        return 80
    return max(60, shutil.get_terminal_size((80, 24)).columns)


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if args.output:
        fmt = FORMAT_BY_EXTENSION.get(_suffix(args.output))
        if fmt is None:
            raise UsageError(
                f"cannot tell the report format from -o {args.output}: use a .json, .csv or .txt name, "
                "or add --format table|json|csv"
            )
        return fmt
    return "table"


def _curves_path(plot: str) -> str:
    stem, ext = os.path.splitext(plot)
    return f"{stem}-curves{ext}"


def _output_paths(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Every file the run may write, as ``(flag, path)``."""
    curves = _curves_path(args.plot) if args.plot and args.sweep else None
    return [
        ("-o", args.output), ("--save-matrix", args.save_matrix), ("--plot", args.plot),
        ("--plot (curves)", curves), ("--instances-csv", args.instances_csv),
    ]  # fmt: skip


def _check_output_file(flag: str, path: str) -> None:
    """An output path must name a file in a folder that exists (one line otherwise)."""
    from fastseg_eval.errors import FastSegError

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FastSegError(f"{flag} {path}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise FastSegError(f"{flag} {path} is a directory; give a file name")


def _check_plot_backend(args: argparse.Namespace) -> None:
    """``--plot`` needs matplotlib: say so before the run, not after it."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        from fastseg_eval.errors import FastSegError
        from fastseg_eval.report.plot import MISSING_MATPLOTLIB

        raise FastSegError(f"--plot: {MISSING_MATPLOTLIB}")


def _check_output_paths(args: argparse.Namespace) -> None:
    """Problems with output paths, found before a possibly long run."""
    _check_suffixes(args)
    from fastseg_eval.io.outputs import check_outputs

    # never into an input store, never two outputs on one file (OutputPathError: exit 2)
    check_outputs(_output_paths(args), {"pred": args.pred, "gt": args.gt, "mask": args.mask})
    for flag, path in (
        ("-o", args.output), ("--save-matrix", args.save_matrix), ("--plot", args.plot),
        ("--instances-csv", args.instances_csv),
    ):  # fmt: skip
        if path:
            _check_output_file(flag, path)
    _check_plot_backend(args)


def _progress(args: argparse.Namespace, evaluate_kwargs: dict[str, Any]) -> Any:
    """A progress bar on stderr, or False."""
    on = args.progress
    if on is None:
        try:
            on = sys.stderr.isatty() and not args.quiet
        except (AttributeError, ValueError):
            on = False
    if not on:
        return False
    from fastseg_eval.io.volume import open_volume
    from fastseg_eval.progress import ProgressBar

    gt = open_volume(
        args.gt, "gt", key=args.gt_key, level=args.level,
        storage_options=evaluate_kwargs["storage_options"],
    )  # fmt: skip
    total = 1
    for s in gt.shape:
        total *= int(s)
    try:
        delay = float(os.environ.get(PROGRESS_DELAY_ENV, "1"))
    except ValueError:
        delay = 1.0
    return ProgressBar(total, delay=delay)


def evaluate_kwargs(args: argparse.Namespace, metric_names: list[str] | None) -> dict[str, Any]:
    """The keyword arguments of :func:`fastseg_eval.evaluate` that ``args`` asks for."""
    return {
        "num_classes": args.num_classes,
        "labels": args.labels,
        "ignore_label": args.ignore_label,
        "mask": args.mask,
        "threshold": args.threshold,
        "channel_axis": args.channel_axis,
        "thresholds": args.sweep,
        "prob_scale": args.prob_scale,
        "tversky_alpha": args.tversky_alpha,
        "tversky_beta": args.tversky_beta,
        "smooth": args.smooth,
        "empty": args.empty,
        "backend": args.backend,
        "workers": args.workers,
        "scheduler": args.scheduler,
        "metrics": metric_names,
        "label_names": args.label_names,
        "background_label": args.background_label,
        "pred_key": args.pred_key,
        "gt_key": args.gt_key,
        "mask_key": args.mask_key,
        "level": args.level,
        "storage_options": dict(args.storage_options) or None,
        "memory_limit": args.memory_limit,
        "per_class_limit": args.per_class_limit,
        "spacing": args.spacing,
        "surface": args.surface,
        "hd_percentile": args.hd_percentile,
        "nsd_tolerance": args.nsd_tolerance,
        "empty_distance": args.empty_distance,
        "geometry_check": args.geometry_check,
        "instances": bool(args.instances or args.instances_csv),
        "iou_threshold": args.iou_threshold,
        "connectivity": args.connectivity,
    }


def save_matrix(res: Any, path: str) -> None:
    """Write the raw int64 matrix (rows = ground truth, columns = prediction) as .npy or .csv."""
    import numpy as np

    from fastseg_eval.errors import FastSegError

    cm = res.confusion_matrix
    if cm is None:
        raise FastSegError(
            f"--save-matrix {path}: no full matrix was kept ({len(res.labels)} labels, diagonal + marginals "
            "mode); the per-class counts are in --format json/csv"
        )
    import io

    from fastseg_eval.io.outputs import save_npy, write_text

    cm = np.asarray(cm, dtype=np.int64)
    if _suffix(path) == ".npy":
        save_npy(path, cm, what="--save-matrix")  # atomic: a failed write keeps the old file
        return
    labels = ",".join(str(int(x)) for x in res.labels)
    header = (
        "fastseg-eval confusion matrix: rows = ground truth, columns = prediction\n"
        f"labels (rows and columns, in order): {labels}"
    )
    buf = io.StringIO()
    np.savetxt(buf, cm, fmt="%d", delimiter=",", header=header)
    write_text(path, buf.getvalue(), what="--save-matrix")


def _write(path: str, text: str) -> None:
    from fastseg_eval.io.outputs import write_text

    write_text(path, text, what="-o")  # atomic: a failed write keeps the old report


def _print(text: str, *, optional: bool = False) -> None:
    """``text`` on stdout; with ``optional`` (a copy of a report written with -o) a closed stdout is fine."""
    from fastseg_eval.io.outputs import write_stdout

    if optional and sys.stdout is None:
        return
    write_stdout(text if text.endswith("\n") else text + "\n")


def _label_name_warnings(res: Any, names: dict[int, str] | None) -> None:
    if not names:
        return
    present = {int(x) for x in res.labels}
    unknown = sorted(k for k in names if k not in present)
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        res.warnings.append(f"--label-names names label(s) {shown} that are not among the labels evaluated")


# ---------------------------------------------------------------------- commands
def run(args: argparse.Namespace) -> int:
    """Evaluate as ``args`` says and write the reports. Raises on errors (``main`` maps them).

    Errors and warnings name options as flags (``--num-classes 3``), not as the library's
    parameters (``num_classes=3``).
    """
    with _flags_in_errors():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from fastseg_eval import api
    from fastseg_eval.metrics.formulas import resolve_metrics
    from fastseg_eval.report.table import format_table

    if _dataset_mode(args):
        return _run_dataset(args)
    fmt = _output_format(args)
    names = resolve_metrics(args.metrics) if args.metrics else None  # unknown name: OptionError -> 2
    _check_output_paths(args)
    kwargs = evaluate_kwargs(args, names)
    bar = _progress(args, kwargs)
    try:
        res = api.evaluate(args.pred, args.gt, progress=bar, **kwargs)
    finally:
        close = getattr(bar, "close", None)
        if close is not None:
            close()
    res.warnings = [_flag_spelling(w) for w in res.warnings]
    _label_name_warnings(res, args.label_names)

    table_metrics = names  # columns: the selected metrics (what fits), else the default set
    if fmt == "json":
        text = res.to_json()
    elif fmt == "csv":
        text = res.to_csv()
    else:
        text = format_table(
            res, color=use_color() and not args.output, metrics=table_metrics,
            width=80 if args.output else _table_width(), max_rows=args.max_rows,
        )  # fmt: skip
    if args.output:
        _write(args.output, text)
        if not args.quiet:
            table = (
                text
                if fmt == "table"
                else format_table(
                    res,
                    color=use_color(),
                    metrics=table_metrics,
                    width=_table_width(),
                    max_rows=args.max_rows,
                )
            )
            _print(table, optional=True)
            print(f"{PROG}: wrote the {fmt} report to {args.output}", file=sys.stderr)
    else:
        _print(text)

    if args.save_matrix:
        save_matrix(res, args.save_matrix)
    if args.instances_csv:
        from fastseg_eval.io.outputs import write_text

        write_text(args.instances_csv, res.to_csv(table="instances"), what="--instances-csv")
    if args.plot:
        from fastseg_eval.io.outputs import atomic_write
        from fastseg_eval.report.plot import plot_result

        note = atomic_write(args.plot, lambda tmp: plot_result(res, tmp), what="--plot")
        if note and not args.quiet:
            print(f"{PROG}: {note}", file=sys.stderr)
        if res.curves:
            from fastseg_eval.report.plot import plot_curves

            curves = _curves_path(args.plot)
            atomic_write(curves, lambda tmp: plot_curves(res, tmp), what="--plot")
            if not args.quiet:
                print(f"{PROG}: wrote ROC / precision-recall curves to {curves}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------- datasets
_DATASET_ONLY = ("--missing", "--regions", "--nnunet-summary", "--resume", "--on-error")


def _dataset_mode(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for a dataset (PRED_DIR GT_DIR, or --cases); usage errors otherwise."""
    from fastseg_eval.dataset import is_case_folder
    from fastseg_eval.errors import InputError

    if args.cases:
        if args.pred or args.gt:
            raise UsageError("--cases replaces PRED GT: give the manifest or the two inputs, not both")
        return True
    if args.pred is None or args.gt is None:
        raise UsageError("the following arguments are required: " + ("PRED, GT" if args.pred is None else "GT"))
    pred_dir, gt_dir = is_case_folder(args.pred), is_case_folder(args.gt)
    if pred_dir and gt_dir:
        return True
    if pred_dir or gt_dir:
        role, folder, other_role, other = ("PRED", args.pred, "GT", args.gt) if pred_dir else ("GT", args.gt, "PRED", args.pred)
        raise InputError(
            f"{role} {folder} is a folder, not a zarr store (no zarr.json, .zarray or .zgroup there): as a folder "
            f"of cases it needs a folder of cases as {other_role} too, but {other} is not one"
        )
    given = {
        "--missing": args.missing != "error", "--regions": args.regions, "--nnunet-summary": args.nnunet_summary,
        "--resume": args.resume, "--on-error": args.on_error != "stop",
    }  # fmt: skip
    for flag in _DATASET_ONLY:
        if given[flag]:
            raise UsageError(f"{flag} applies to datasets: PRED_DIR GT_DIR (two folders of cases) or --cases CSV")
    return False


def _check_suffixes(args: argparse.Namespace) -> None:
    """Output files whose format comes from their suffix must have one that names a format."""
    if args.save_matrix and _suffix(args.save_matrix) not in MATRIX_EXTENSIONS:
        raise UsageError(f"--save-matrix {args.save_matrix}: the name must end in .npy or .csv")
    if args.plot and _suffix(args.plot) not in PLOT_EXTENSIONS:
        raise UsageError(f"--plot {args.plot}: the name must end in {', '.join(PLOT_EXTENSIONS)}")
    if args.instances_csv and _suffix(args.instances_csv) != ".csv":
        raise UsageError(f"--instances-csv {args.instances_csv}: the name must end in .csv")


def _check_dataset_outputs(args: argparse.Namespace, specs: Sequence[Any]) -> list[tuple[str, str | None]]:
    """Outputs never onto a case (or into a zarr case), never among the cases of an input folder."""
    from fastseg_eval.io.formats import file_format
    from fastseg_eval.io.outputs import OutputPathError, check_outputs

    _check_suffixes(args)
    outputs = [*_output_paths(args), ("--nnunet-summary", args.nnunet_summary), ("--resume", args.resume)]
    inputs: dict[str, Any] = {"cases manifest": args.cases}
    for sp in specs:
        for role, src in (("pred", sp.pred), ("gt", sp.gt), ("mask", sp.mask)):
            if isinstance(src, str):
                inputs[f"{role} of case {sp.case}"] = src
    check_outputs(outputs, inputs)
    folders = {os.path.realpath(f): f for f in (args.pred, args.gt, args.mask) if f and os.path.isdir(f)}
    for flag, path in outputs:
        if not path:
            continue
        home = os.path.dirname(os.path.realpath(path))
        if home in folders and (file_format(path) or path.lower().rstrip("/").endswith((".zarr", ".zip"))):
            raise OutputPathError(
                f"{flag} {path} would land among the cases of {folders[home]} (and be read as a case next time); "
                "write it elsewhere"
            )
        if flag != "--plot (curves)":
            _check_output_file(flag, path)
    _check_plot_backend(args)
    return outputs


def _dataset_progress(args: argparse.Namespace) -> Any:
    on = args.progress
    if on is None:
        on = _stderr_is_tty() and not args.quiet
    if not on:
        return False
    from fastseg_eval.dataset import CaseProgress

    try:
        delay = float(os.environ.get(PROGRESS_DELAY_ENV, "1"))
    except ValueError:
        delay = 1.0
    return lambda total, done: CaseProgress(total, done=done, delay=delay)


def _run_dataset(args: argparse.Namespace) -> int:
    """``fastseg-eval PRED_DIR GT_DIR`` / ``--cases``: every case, then one report (exit 1 if a case failed)."""
    from fastseg_eval.dataset import evaluate_dataset, resolve_cases, summary_line
    from fastseg_eval.io.outputs import atomic_write
    from fastseg_eval.metrics.formulas import resolve_metrics

    if args.sweep:
        raise UsageError("--sweep is not available for datasets yet; evaluate the cases one by one")
    fmt = _output_format(args)
    names = resolve_metrics(args.metrics) if args.metrics else None
    specs, _, _ = resolve_cases(args.pred, args.gt, cases=args.cases, missing=args.missing, mask=args.mask)
    _check_dataset_outputs(args, specs)
    kwargs = evaluate_kwargs(args, names)
    for k in ("workers", "scheduler", "label_names", "thresholds"):
        kwargs.pop(k, None)
    if args.instances_csv:  # every case's per-instance rows, kept for the CSV
        kwargs["instances_per_gt"] = True
    ds = evaluate_dataset(
        args.pred, args.gt, cases=args.cases, missing=args.missing, regions=args.regions, workers=args.workers,
        scheduler=args.scheduler, progress=_dataset_progress(args), resume=args.resume, on_error=args.on_error,
        label_names=args.label_names, **kwargs,
    )  # fmt: skip
    ds.warnings = [_flag_spelling(w) for w in ds.warnings]
    for c in ds.per_case:
        c.warnings = [_flag_spelling(w) for w in c.warnings]
    width = 80 if args.output else _table_width()
    if fmt == "json":
        text = ds.to_json()
    elif fmt == "csv":
        text = ds.to_csv()
    else:
        text = ds.to_table(color=use_color() and not args.output, metrics=names, width=width)
    if args.output:
        _write(args.output, text)
        if not args.quiet:
            table = text if fmt == "table" else ds.to_table(color=use_color(), metrics=names, width=_table_width())
            _print(table, optional=True)
            print(f"{PROG}: wrote the {fmt} report to {args.output}", file=sys.stderr)
    else:
        _print(text)
    if args.nnunet_summary:
        data = ds.to_nnunet_summary().encode("utf-8")  # as nnU-Net writes it: no newline at the end

        def write(p: str) -> None:
            with open(p, "wb") as fh:
                fh.write(data)

        atomic_write(args.nnunet_summary, write, what="--nnunet-summary")
    if args.save_matrix:
        save_matrix(ds.pooled, args.save_matrix)
    if args.instances_csv:
        from fastseg_eval.io.outputs import write_text

        write_text(args.instances_csv, ds.instances_csv(), what="--instances-csv")
    if args.plot:
        from fastseg_eval.report.plot import plot_result

        atomic_write(args.plot, lambda tmp: plot_result(ds.pooled, tmp), what="--plot")
    if not args.quiet:
        print(f"{PROG}: {summary_line(ds)}", file=sys.stderr)
    if ds.failed_cases:
        print(
            f"{PROG}: error: {len(ds.failed_cases)} case(s) could not be evaluated (first: {ds.failed_cases[0].error}); "
            "they are listed under failed_cases in the JSON report",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    """Write the demo pair and print the command that evaluates it."""
    from fastseg_eval.demo import write_demo_pair
    from fastseg_eval.errors import FastSegError

    directory = args.directory or args.demo_dir
    if not directory:
        raise UsageError("demo needs a directory, e.g. fastseg-eval demo /tmp/fse-demo")
    try:
        shape = [int(s) for s in str(args.shape).replace("x", ",").split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--shape {args.shape!r}: expected N or Z,Y,X (e.g. 96 or 64,128,128)") from None
    if not shape or any(s < 2 for s in shape):
        raise UsageError(f"--shape {args.shape!r}: every size must be at least 2")
    if not 2 <= args.classes <= 255:
        raise UsageError(f"--classes {args.classes}: must be between 2 and 255")
    shape_t = tuple(shape) * 3 if len(shape) == 1 else tuple(shape)
    try:
        pred, gt = write_demo_pair(
            directory, shape=shape_t, num_classes=args.classes, seed=args.seed, zarr_format=args.zarr_format
        )
    except FileExistsError as e:
        raise FastSegError(str(e)) from e
    except OSError as e:
        raise FastSegError(f"cannot write the demo to {directory}: {e.strerror or e}") from e
    dims = "x".join(map(str, shape_t))
    print(f"wrote {pred} (prediction) and {gt} (ground truth):")
    print(f"  zarr v{args.zarr_format}, uint8 {dims}, labels 0..{args.classes - 1} (0 = background)")
    print("evaluate them with:")
    print(f"  {PROG} {shlex.quote(pred)} {shlex.quote(gt)}")
    return EXIT_OK


def _is_demo(argv: Sequence[str]) -> bool:
    return bool(argv) and argv[0] == "demo" or any(a == "--demo" or a.startswith("--demo=") for a in argv)


def _error(message: str) -> None:
    first = " ".join(str(message).split())  # one line
    print(f"{PROG}: error: {first}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastseg-eval`` console script; returns the exit code.

    SIGTERM is handled like Ctrl-C (SIGINT): the run stops, nothing is written, one line says
    so, and the exit code is 128 + the signal number (130, 143).
    """
    from fastseg_eval.interrupts import terminate_as_interrupt

    with terminate_as_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.INFO)
        logging.getLogger("fastseg_eval").setLevel(logging.DEBUG)
    try:
        if _is_demo(argv):
            args = build_demo_parser().parse_args(argv[1:] if argv[0] == "demo" else argv)
            return run_demo(args)
        args = build_parser().parse_args(argv)
        return run(args)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_ERROR)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        _error(f"{e} (see {PROG} --help)")
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupts.Interrupted)
        from fastseg_eval.interrupts import exit_code, signal_name

        if debug:
            traceback.print_exc()
        name = signal_name(e)
        after_echo = "\n" if _stderr_is_tty() else ""  # the terminal echoed ^C on the line
        suffix = "" if name == "SIGINT" else f" ({name})"
        print(f"{after_echo}{PROG}: interrupted{suffix}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # e.g. `fastseg-eval ... | head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except Exception as e:
        from fastseg_eval.errors import FastSegError, OptionError

        if debug:
            traceback.print_exc()
        if isinstance(e, OptionError):
            _error(str(e))
            return EXIT_USAGE
        if isinstance(e, FastSegError):
            _error(str(e))
            return EXIT_ERROR
        if isinstance(e, MemoryError):
            _error(
                "out of memory; try fewer --workers" + ("" if debug else " (rerun with --debug for details)")
            )
            return EXIT_ERROR
        hint = "" if debug else " (this is unexpected; rerun with --debug for the traceback)"
        _error(f"{type(e).__name__}: {e}{hint}")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
