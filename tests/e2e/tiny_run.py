"""What the launcher, SLURM and multi-host tests train: a tiny CoCa config and a few synth-shapes shards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from needs import missing_tools, root_problem, skip_or_fail

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TINY_YAML = """\
model:
  overrides: {image_size: 32, patch_size: 8, vision_width: 32, vision_layers: 1, vision_heads: 2,
              vision_mlp_dim: 64, caption_queries: 8, pooler_heads: 2, context_length: 12, text_width: 32,
              text_heads: 2, text_mlp_dim: 64, text_layers: 1, decoder_layers: 1, embed_dim: 32}
schedule: {steps: 2, global_batch_size: 8, micro_batch_size: 4, warmup_steps: 1}
logging: {log_every: 1, tensorboard: false}
checkpoint: {every: 0, save_final: true}
eval: {every: 0}
"""


def make_tiny_run(root, env=None) -> None:
    """root/shapes/{train,val} (64 + 16 images at 32px) and root/tiny.yaml."""
    subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", str(root / "shapes"),
                    "--train-samples", "64", "--val-samples", "16", "--image-size", "32", "--shard-size", "16",
                    "--workers", "1"], check=True, capture_output=True, env=env)
    (root / "tiny.yaml").write_text(TINY_YAML)


# What each service script needs on the machine (it installs the Debian packages itself when run as root).
SERVICE_TOOLS = {
    "test_hosts.sh": (("sshd", "pdsh", "ssh-keygen", "ip"), "openssh-server openssh-client pdsh iproute2"),
    "slurm_cluster.sh": (("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel"),
                         "slurmctld slurmd slurm-client munge"),
}


@contextlib.contextmanager
def root_service(script: str, directory, *args, why: str, tests: str):
    """`scripts/<script> start DIRECTORY ARGS...` (a real service these tests need: it must run as root), and
    `stop DIRECTORY` afterwards, whatever the tests did. Without root (or without the service's tools and apt-get
    to install them) the calling tests skip with one line saying how to run them (`tests`: their file), or fail
    where MEGACOCA_REQUIRE_ALL_TESTS=1 (CI)."""
    tools, packages = SERVICE_TOOLS[script]
    problem = root_problem(os.geteuid(), missing_tools(tools), missing_tools(["apt-get"]) == [], packages)
    if problem:
        python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO + os.sep) else sys.executable
        skip_or_fail(f"{why}: {problem}", f"run them as root: sudo make test, or sudo {python} -m pytest {tests} "
                                          "(CI does)")
    path = os.path.join(REPO, "scripts", script)
    started = subprocess.run(["bash", path, "start", str(directory), *args], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield
    finally:
        subprocess.run(["bash", path, "stop", str(directory)], capture_output=True)
