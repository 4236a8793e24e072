"""Inputs and outputs: open volumes read-only, read chunks, reopen stores on workers, write reports.

* :mod:`~fastseg_eval.io.volume`: numpy / dask / zarr / OME-Zarr / zip / URL inputs, validated;
* :mod:`~fastseg_eval.io.formats`: files (NIfTI, TIFF, .npy, HDF5, NRRD / MHA) read by region;
* :mod:`~fastseg_eval.io.geometry`: do pred and gt lie on the same grid (spacing, origin, direction)?
* :mod:`~fastseg_eval.io.chunkread`: the fast whole-chunk reader for local zarr stores;
* :mod:`~fastseg_eval.io.locator`: store locators that let a dask worker reopen an input itself;
* :mod:`~fastseg_eval.io.outputs`: atomic writes that never land inside an input;
* :mod:`~fastseg_eval.io.components`: semantic masks -> instances (connected components, in memory).
"""
