"""The README and the repository agree (issue 11): files it names exist, its anchors resolve,
the quick start's outputs are git-ignored, one benchmark size variable, and the averages say
which of them include the background."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "benchmarks" / "README.md"]


def repo_files() -> list[str]:
    """Files of the repository (tracked and new, not ignored), as paths relative to its root."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out if (REPO / p).exists()]


def named_files(text: str) -> set[str]:
    """Repository file names a document mentions: ``*.md`` / ``*.py`` / config names and paths."""
    links = {m for m in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text) if ":" not in m}  # relative links
    text = re.sub(r"https?://\S+", "", text)
    names = set(re.findall(r"(?<![\w/.*-])((?:[\w.-]+/)*[\w.*-]+\.(?:md|py|toml|cfg|ini))\b", text))
    names |= set(re.findall(r"`((?:\.ci|tests|benchmarks|fastseg_eval)/[^`\s]*)`", text))
    return names | links


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_files_named_in_the_docs_exist(doc):
    files = repo_files()
    basenames = {Path(p).name for p in files}
    dirs = {str(parent) + "/" for p in files for parent in Path(p).parents if str(parent) != "."}
    missing = []
    for name in sorted(named_files(doc.read_text())):
        if name.endswith("/"):
            ok = name in dirs
        elif "/" in name:  # a path from the repository root (globs allowed)
            ok = any(fnmatch.fnmatch(p, name) for p in files)
        else:  # a bare file name: some file of the repository
            ok = name in basenames or name in ("bench.md",)  # bench.md: make_table.py's output
        if not ok:
            missing.append(name)
    assert not missing, f"{doc.name} names files the repository does not have: {missing}"


def github_slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_readme_anchor_links_resolve():
    text = README.read_text()
    body = re.sub(r"```.*?```", "", text, flags=re.S)
    slugs = {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, flags=re.M)}
    anchors = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert anchors, "the README's contents line links its sections"
    assert anchors <= slugs, f"anchors without a heading: {sorted(anchors - slugs)}"


def test_quick_start_output_is_git_ignored():
    quick = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    demo_dir = re.search(r"fastseg-eval demo (\S+)", quick).group(1)
    r = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", f"{demo_dir}/pred.zarr/zarr.json"], cwd=REPO, check=False
    )
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, f"{demo_dir}/, written by the README's quick start, is not in .gitignore"


def test_benchmarks_have_one_size_variable():
    """``FASTSEG_BENCH_SIZE`` everywhere; the former ``FASTSEG_BENCH_SMALL`` only as a deprecated alias."""
    bench = REPO / "benchmarks"
    for path in [*bench.glob("*.py"), *DOCS]:
        text = path.read_text()
        for var in set(re.findall(r"FASTSEG_BENCH_[A-Z]+", text)):
            assert var in ("FASTSEG_BENCH_SIZE", "FASTSEG_BENCH_DATA", "FASTSEG_BENCH_SMALL"), (path, var)
        if path.name not in ("data.py", "conftest.py") and path != bench / "README.md":
            assert "FASTSEG_BENCH_SMALL" not in text, f"{path.name} still uses FASTSEG_BENCH_SMALL"
    assert "deprecated" in (bench / "README.md").read_text().split("FASTSEG_BENCH_SMALL", 1)[1][:200]


def test_readme_says_weighted_includes_the_background():
    text = " ".join(README.read_text().split())
    assert re.search(r"`weighted`[^.]*includes the background", text)
    assert re.search(r"`weighted`[^.]*(unlike|where) `(fg mean|foreground_mean)`", text)
