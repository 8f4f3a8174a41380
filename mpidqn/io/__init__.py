"""File formats without training knowledge: HDF5 trees, the run log, the run-dir lock."""
