"""Wheels for what a lent GPU machine lacks, made here where the package registries are reachable (issue 24).

    make gpu-bundle                                 # = python scripts/gpu_bundle.py --out gpu_bundle --python 3.12
    python scripts/gpu_bundle.py --out DIR --python 3.11     # for this machine's Python (the smoke test)

The GPU machine has Python 3.12 with torch (2.11, CUDA 13), triton, sentencepiece, safetensors, tensorboard and timm
(so numpy, pillow, pyyaml), but no DeepSpeed, webdataset, open_clip or pytest, and reaches no registry. This writes
DIR/wheels/ (megacoca itself; DeepSpeed built from its source distribution with DS_BUILD_OPS=0, a pure-Python wheel
whose ops would compile on first use, none of which the check uses; DeepSpeed's, webdataset's and pytest's
dependencies, binary ones for the target Python), at the versions this environment runs, so that
`scripts/gpu_env.sh` installs them with `pip --no-index --no-deps`. The whole bundle is a few MB: it travels with the
working tree to the device machine (the device tool's `carry`, 64 MiB in all).
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the GPU machine has (the device tool's description), by distribution name.
MACHINE = ["torch", "torchvision", "triton", "sentencepiece", "safetensors", "tensorboard", "timm", "numpy", "pillow",
           "pyyaml"]
# What the check needs beyond them (and megacoca itself, whose demo-only matplotlib and the like the check does not
# need). The bundle holds every distribution these reach that the machine's do not (`bundled`), at this
# environment's versions.
REQUIREMENTS = ["deepspeed", "webdataset", "pytest", "pytest-timeout"]


def closure(roots: list[str]) -> set[str]:
    """Distributions reachable from `roots` through their requirements in this environment's metadata (markers
    evaluated for this interpreter, extras not followed); a root not installed here is left out."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def bundled() -> list[str]:
    """The distributions the bundle carries as downloaded wheels: what REQUIREMENTS reach and the machine does not
    (DeepSpeed apart: built from its source distribution)."""
    return sorted(closure(REQUIREMENTS) - closure(MACHINE) - {"deepspeed"})
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build(out: str, python: str) -> list[str]:
    wheels = os.path.join(out, "wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    os.makedirs(wheels)
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, REPO)
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as tmp:
        version = metadata.version("deepspeed")
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"deepspeed=={version}")
        env = dict(os.environ, DS_BUILD_OPS="0")
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
             *glob.glob(os.path.join(tmp, "deepspeed-*")), env=env)
    pins = [f"{name}=={metadata.version(name)}" for name in bundled()]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _pip("download", "-q", "--no-deps", "--only-binary", ":all:", "--python-version", python, "--implementation",
         "cp", *platforms, "-d", wheels, *pins)
    return sorted(os.listdir(wheels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "gpu_bundle"), help="the bundle's folder (replaced)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version (binary wheels)")
    args = parser.parse_args(argv)
    names = build(args.out, args.python)
    size = sum(os.path.getsize(os.path.join(args.out, "wheels", n)) for n in names)
    print(f"wrote {args.out}: {len(names)} wheels, {size / 2**20:.1f} MiB, for Python {args.python}")
    for name in names:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
