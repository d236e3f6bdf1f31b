#!/usr/bin/env bash
# Download the wheels the GPU device image lacks (it has torch 2.11, Triton 3.6, Python 3.12,
# transformers and torchvision, and reaches no registry) into wheels/ (gitignored; it travels
# with the working tree when the device call carries it: carry=["wheels"]).
#
#   bash benchmarks/gpu_wheels.sh            # here, with PyPI access (about 3.5 MB)
#   pip install --no-deps --no-index wheels/*.whl     # on the device
#
# benchmarks/gpu_check.py needs only loguru (it imports splitq_modifier's runtime, kernels and
# testing helpers without the package's library integrations). The others make a full
# `import splitq_modifier` work (compressed-tensors 0.19 and its pydantic stack, as pinned
# in the development environment); that import also checks transformers >=5,<6, which is
# left to the image (a transformers 5 wheel is 14 MB and needs huggingface-hub >= 1).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST" \
    loguru==0.7.3 \
    compressed-tensors==0.19.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing-extensions==4.16.0 psutil==7.1.3
du -sh "$DEST"
