"""The GPU check end to end on CPU (issue 24), so that it cannot rot between the rare sessions a GPU is lent: the
bundle `make gpu-bundle` makes (built here for this machine's Python), installed with no network into a fresh venv
that sees only what the GPU machine has (torch, triton, sentencepiece, safetensors, tensorboard, timm and what they
pull in: the packages reachable from those in this environment's metadata), then `scripts/gpu_check.py --smoke`:
every part runs (Triton's interpreter, coca_tiny, a quick calibration) and writes every table it promises, with
"not measured: no CUDA device" where a GPU figure belongs."""

import csv
import importlib.metadata as metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from gpu_bundle import MACHINE, closure  # noqa: E402


def _machine_site(tmp_path) -> str:
    """A folder of links to the machine's packages only (their modules and metadata from this environment)."""
    site = tmp_path / "machine_site"
    site.mkdir()
    for name in closure(MACHINE):
        dist = metadata.distribution(name)
        tops = {str(path).split("/")[0] for path in dist.files or [] if not str(path).startswith("..")}
        base = dist.locate_file("")
        for top in tops:
            source = os.path.join(base, top)
            if os.path.exists(source) and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(source)
    return str(site)


@pytest.mark.slow  # ~2 minutes: a bundle, a venv, every part of the check at tiny sizes
@pytest.mark.timeout(900)
def test_the_gpu_check_runs_from_the_bundle_in_a_fresh_venv(tmp_path):
    bundle, venv, out = tmp_path / "bundle", tmp_path / "venv", tmp_path / "out"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, "scripts/gpu_bundle.py", "--out", str(bundle), "--python", python], cwd=REPO,
                   check=True, capture_output=True)
    env = dict(os.environ, MACHINE_SITE=_machine_site(tmp_path), GPU_PYTHON=sys.executable)
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    made = subprocess.run(["bash", "scripts/gpu_env.sh", str(bundle), str(venv)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "gpu_env: torch" in made.stdout
    # the venv's megacoca is the bundle's wheel, not this checkout's editable install
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import megacoca, deepspeed; "
                            "print(megacoca.__file__); print(deepspeed.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    paths = [line for line in where.splitlines() if line.endswith("__init__.py")]
    assert len(paths) == 2 and all(path.startswith(str(venv)) for path in paths), where

    run = subprocess.run([str(venv / "bin" / "python"), "scripts/gpu_check.py", "--out", str(out), "--smoke",
                          "--limit-scale", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for part in ("env", "kernel_tests", "bench", "calibrate", "train", "generate"):
        assert f"| {part} | ok, " in summary, summary[:2000]
        assert (out / f"{part}.csv").exists(), part
    for title in ("## Environment", "## Kernel tests", "## Kernel benchmarks", "## Calibration", "## Training steps",
                  "## Cached caption generation"):
        assert title in summary
    assert "not measured: no CUDA device" in summary
    with open(out / "train.csv") as f:
        train = list(csv.DictReader(f))
    assert [row["status"] for row in train] == ["ok"] * 3
    assert {row["ds"] for row in train} == {"zero2_bf16", "zero3_bf16"} and {row["overlap"] for row in train} == \
        {"auto", "off"}
    assert all(row["mfu"] == "not measured: no CUDA device" and float(row["calibrated_ratio"]) > 0 for row in train)
    with open(out / "kernel_tests.csv") as f:
        tests = next(csv.DictReader(f))
    assert int(tests["tests"]) > 0 and tests["failures"] == tests["errors"] == "0"
    with open(out / "generate.csv") as f:
        assert [row["batch"] for row in csv.DictReader(f)] == ["1", "4"]


def test_the_check_refuses_an_unknown_part(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--parts", "env,gpus"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "unknown part(s) gpus" in run.stderr


def test_a_part_past_its_limit_is_stopped_and_the_rest_still_runs(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--smoke", "--parts",
                          "env,train", "--limit-scale", "0.01"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| train | timed out after 2 s" in summary and "| kernel_tests | skipped |" in summary
