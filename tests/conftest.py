"""Shared test configuration: hypothesis profiles, import path for the test helpers, zarr writers.

Hypothesis profiles (select with ``--hypothesis-profile NAME`` or ``HYPOTHESIS_PROFILE=NAME``):

* ``default``: no deadline (numba compiles on first use), no example database on disk (keeps
  the tree clean), tests set their own modest ``max_examples``;
* ``ci``: the same, derandomized, for reproducible CI runs;
* ``thorough``: ten times the examples, for a long local run.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# ``import strategies`` works whether or not tests/ is a package and whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_COMMON = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("default", **_COMMON)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(params=[2, 3], ids=["zarr-v2", "zarr-v3"])
def zarr_format(request) -> int:
    """Both on-disk zarr formats."""
    return request.param


def write_zarr(
    path: str | os.PathLike,
    data: np.ndarray,
    chunks: tuple[int, ...],
    *,
    zarr_format: int = 3,
    fill_value: int | None = 0,
):
    """Write ``data`` as a zarr array at ``path`` with chunk shape ``chunks``; returns it opened read-only."""
    import zarr

    arr = zarr.create_array(
        store=str(path),
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        fill_value=fill_value,
        zarr_format=zarr_format,
        overwrite=True,
    )
    arr[...] = data
    return zarr.open_array(store=str(path), mode="r")
