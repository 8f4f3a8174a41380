#!/usr/bin/env bash
# Run here, before a call to a lent 16-CPU machine: the wheels that its image lacks, for its Python
# (3.12 by default), into .device/wheels (ignored by git; name .device in the call's carry).
#   bash benchmarks/device/wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${1:-3.12}"
mkdir -p .device/wheels
pip download -q --only-binary=:all: --no-deps --python-version "$py" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels mpich mpi4py gymnasium farama-notifications cloudpickle minatar
du -sh .device/wheels
