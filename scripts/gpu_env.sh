#!/usr/bin/env bash
# The GPU check's environment on a machine without a package registry (issue 24): a venv that sees the machine's
# own packages (torch, triton, ...) and installs the rest from the bundle `make gpu-bundle` wrote, with no network.
#   scripts/gpu_env.sh BUNDLE VENV          then  VENV/bin/python scripts/gpu_check.py --out OUT
# GPU_PYTHON: the machine's python (default python3). MACHINE_SITE (tests only): a folder of packages standing in for
# the machine's, added to the venv's path instead of --system-site-packages.
set -euo pipefail
bundle=${1:?usage: gpu_env.sh BUNDLE VENV}
venv=${2:?usage: gpu_env.sh BUNDLE VENV}
python=${GPU_PYTHON:-python3}
if [ ! -d "$bundle/wheels" ]; then
    echo "gpu_env.sh: no wheels in $bundle: run 'make gpu-bundle' where the package registries are reachable" >&2
    exit 2
fi
rm -rf "$venv"
if [ -n "${MACHINE_SITE:-}" ]; then
    "$python" -m venv "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$MACHINE_SITE" > "$site/machine_packages.pth"
else
    "$python" -m venv --system-site-packages "$venv"
fi
export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
# every wheel as it is, no resolution: the bundle holds exactly what the check needs beyond the machine's packages
# (scripts/gpu_bundle.py computes it from the packages' requirements), and a resolver would also second-guess the
# machine's own (a venv's bundled setuptools against torch's requirement, say)
"$venv/bin/python" -m pip install -q --no-index --no-deps "$bundle"/wheels/*.whl
"$venv/bin/python" -c "import torch, deepspeed, webdataset, megacoca, megacoca_kernels; print('gpu_env: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| cuda', torch.cuda.is_available())"
