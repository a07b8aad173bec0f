"""Tests that need what a user's machine may lack (root, Debian packages): skip there with one line saying why and
how to run them, but fail in CI, where `.ci/run` sets MEGACOCA_REQUIRE_ALL_TESTS=1, so that a green CI means
they ran. Importable from any test module (tests/ is on sys.path: pytest puts tests/conftest.py's directory there).
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ALL = "MEGACOCA_REQUIRE_ALL_TESTS"
# Where Debian keeps daemons (sshd, slurmd): often not on a user's PATH
SYSTEM_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def missing_tools(tools) -> list[str]:
    """The commands of `tools` found neither on PATH nor in the system directories."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_DIRS])
    return [tool for tool in tools if shutil.which(tool, path=path) is None]


def root_problem(euid: int, missing: list[str], has_apt: bool, packages: str) -> str | None:
    """Why a test that starts system services cannot run here (None: it can). It needs root, and its tools, or
    apt-get to install `packages` (the service script installs them as root)."""
    if euid != 0:
        return "needs root"
    if missing and not has_apt:
        return f"needs {' '.join(missing)} (Debian: {packages}) and there is no apt-get to install them"
    return None


def skip_or_fail(problem: str, how: str, environ=None) -> None:
    """Skip the calling test (one line: the problem, then how to run it), or fail it when CI requires every test."""
    __tracebackhide__ = True  # the skip or failure is reported at the calling test's line, not here
    environ = os.environ if environ is None else environ
    if environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{problem}, and {REQUIRE_ALL}=1 requires every test to run", pytrace=False)
    pytest.skip(f"{problem}; {how}")
