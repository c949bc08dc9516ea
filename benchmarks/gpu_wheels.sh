#!/usr/bin/env bash
# Download, into .whl/ at the repo root, the wheels that benchmarks/gpu_check.sh installs on the
# lent H200 machine (Python 3.12, x86_64, no internet). Run here, where pip reaches PyPI:
#
#     bash benchmarks/gpu_wheels.sh            # then carry ".whl" in the device run (see gpu_check.sh)
#
# What the machine lacks, from /work/.library/device/KINDS.md's package list ('cuda' image, read
# 2026-11-17): it has torch, torchvision, numpy, pillow, tqdm, regex, safetensors, huggingface-hub,
# timm, transformers, matplotlib. It does NOT have:
#   open_clip_torch  ctp.models builds every model with it (ClipLoss for the reference step too)
#   ftfy             open_clip's tokenizer imports it at import time
#   wcwidth          ftfy's one requirement
# ~2.3 MB together (open_clip and ftfy py3-none-any, wcwidth a cp310-abi3 manylinux2014 x86_64
# wheel, which CPython 3.12 loads). Their other needs (torch, torchvision, regex, tqdm,
# huggingface-hub, safetensors, timm>=1.0.17) are in the image. Nothing else is carried on
# purpose: the image's own torch/transformers/huggingface-hub/timm are kept (a carried copy
# would shadow them on PYTHONPATH and could break the ones that depend on them); open_clip only
# try-imports transformers and huggingface-hub.
# EXTRA=1 also fetches regex and safetensors (compiled, cp312 manylinux), for an image that has
# lost them: gpu_check.sh's install step prints the import check that would show it.
# Versions are /work/main/.venv's (pip freeze, 2026-12-02); the script warns if the venv differs.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
[ "${EXTRA:-0}" = 0 ] || WHEELS+=(regex==2026.11.19 safetensors==0.8.0)
if [ -z "${PIP:-}" ]; then
  if [ -x /work/main/.venv/bin/python ]; then PIP="/work/main/.venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
fi

# keep .whl out of git (it travels only as a carried path); .gitignore has it, this covers old checkouts
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ] && ! git check-ignore -q .whl/x.whl 2>/dev/null; then
  mkdir -p "$(dirname "$exclude")" && echo /.whl/ >>"$exclude"
fi

# warn when the pins drift from the project venv
if freeze=$($PIP freeze 2>/dev/null); then
  for w in "${WHEELS[@]}"; do
    name=${w%%==*}
    have=$(grep -i "^${name//_/[-_]}==" <<<"$freeze" || true)
    [ -z "$have" ] || [ "${have,,}" = "${w,,}" ] || echo "note: venv has $have, downloading $w" >&2
  done
fi

mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two stop the install there
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
