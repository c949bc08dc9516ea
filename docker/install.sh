#!/usr/bin/env bash
# The image's build steps, one place: the Dockerfile RUNs them, and tests/test_deploy.py runs the
# same steps outside Docker (a throwaway venv) so they cannot rot.
#
#   docker/install.sh deps [--print]     the runtime deps from pyproject.toml ([project] dependencies
#                                        + the service extra): the layer built before the source is
#                                        copied, so a code change does not reinstall torch.
#                                        --print: list them, install nothing.
#   docker/install.sh package [--no-deps]   pip install "$SRC[service]" (not editable) and the
#                                        healthcheck as ctp-healthcheck next to the ctp script.
#   docker/install.sh check [--cuda]     from the installed copy (not the source tree): every role's
#                                        module imports, `ctp --help` lists them, every package-data
#                                        pattern of pyproject.toml matches files; --cuda: torch is a
#                                        CUDA build (no GPU needed).
#   docker/install.sh user               the non-root user (uid 10001) and /data owned by it.
#
# Several steps may follow one another in one call: `install.sh package check --cuda user`.
# Environment: PYTHON (default python3): the interpreter whose environment gets the packages;
# SRC (default: the repository holding this script).
set -euo pipefail

PYTHON=${PYTHON:-python3}
SRC=${SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
APP_USER=ctp
APP_UID=10001
DATA=/data
PIP=("$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check)

requirements() {
    # [project] dependencies + the service extra, one requirement a line (tomllib: Python 3.11+)
    "$PYTHON" - "$SRC/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["service"]))
PY
}

step_deps() {
    local reqs
    reqs=$(requirements)
    if [[ ${1:-} == --print ]]; then
        echo "$reqs"
        return
    fi
    # torch==2.9.1 from PyPI on linux x86_64 is the CUDA 12.8 build; its CUDA runtime comes as
    # nvidia-* wheels, so the base image needs no CUDA toolkit (the host driver is mounted in).
    "${PIP[@]}" -r <(echo "$reqs")
}

step_package() {
    local extra=()
    [[ ${1:-} == --no-deps ]] && extra=(--no-deps)
    # A regular (not editable) install: the image holds no source tree to import from.
    local had_build=0
    [[ -e $SRC/build ]] && had_build=1
    "${PIP[@]}" "${extra[@]}" "$SRC[service]"
    ((had_build)) || rm -rf "$SRC/build"  # setuptools builds in the tree; leave no trace
    local bin
    bin=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    install -m 0755 "$SRC/docker/healthcheck.py" "$bin/ctp-healthcheck"
}

step_check() {
    local cuda=0
    [[ ${1:-} == --cuda ]] && cuda=1
    local bin
    bin=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    # from / so the current directory cannot shadow the installed packages
    (cd / && CHECK_CUDA=$cuda "$PYTHON" - "$SRC/pyproject.toml" <<'PY'
import importlib
import os
import sys
import tomllib
from pathlib import Path

roles = ["service.ingest", "service.trainer", "service.serve.api", "service.produce", "service.status", "service.local.up"]
for name in ["ctp", "service", "service.cli", "service.settings", *roles]:
    importlib.import_module(name)
import ctp

installed = Path(ctp.__file__).resolve()
if not installed.is_relative_to(Path(sys.prefix).resolve()):
    sys.exit(f"ctp imported from {installed}, not from the environment at {sys.prefix}")
# every package-data pattern of pyproject.toml matches files in the installed copy
with open(sys.argv[1], "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
for package, patterns in package_data.items():
    root = Path(importlib.import_module(package).__file__).parent
    for pattern in patterns:
        if not any(p.is_file() for p in root.glob(pattern)):
            sys.exit(f"package data {package}/{pattern} missing from the installed package")
import torch

print(f"ctp {installed.parent}; torch {torch.__version__} (CUDA build: {torch.version.cuda})")
if os.environ["CHECK_CUDA"] == "1" and not torch.version.cuda:
    sys.exit(f"torch {torch.__version__} is not a CUDA build")
PY
    )
    local usage
    usage=$(cd / && "$bin/ctp" --help)
    for role in ingest train serve produce status; do
        grep -qE "^  $role " <<<"$usage" || { echo "ctp --help does not list $role" >&2; exit 1; }
    done
    "$PYTHON" -m py_compile "$bin/ctp-healthcheck"
    echo "check: ok"
}

step_user() {
    # a fixed uid (not 0) so volumes and Kubernetes' runAsNonRoot can rely on it
    id -u "$APP_USER" >/dev/null 2>&1 || useradd --uid "$APP_UID" --user-group --create-home --shell /usr/sbin/nologin "$APP_USER"
    mkdir -p "$DATA"
    chown "$APP_UID:$APP_UID" "$DATA"  # a new named volume mounted here takes this owner
}

(($#)) || { sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2; }
while (($#)); do
    step=$1
    shift
    args=()
    while (($#)) && [[ $1 == --* ]]; do args+=("$1"); shift; done
    case $step in
        deps | package | check | user) "step_$step" "${args[@]}" ;;
        *) echo "unknown step: $step (deps, package, check, user)" >&2; exit 2 ;;
    esac
done
