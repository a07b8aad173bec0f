"""tests/needs.py: a test that needs root or Debian packages skips on a user's machine with one line saying why
and how to run it, and fails instead where CI sets MEGACOCA_REQUIRE_ALL_TESTS=1; the SLURM and multi-host
fixtures (tests/e2e/tiny_run.py's root_service) decide that way before starting anything."""

import os
import sys

import pytest
from needs import REQUIRE_ALL, missing_tools, root_problem, skip_or_fail

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e"))

import tiny_run  # noqa: E402


def test_root_problem():
    assert root_problem(1000, [], True, "pkg") == "needs root"
    assert root_problem(1000, ["slurmd"], True, "pkg") == "needs root"
    assert root_problem(0, [], False, "pkg") is None
    assert root_problem(0, ["slurmd"], True, "pkg") is None  # the service script installs it as root
    assert root_problem(0, ["slurmd", "munged"], False, "slurmd munge") == \
        "needs slurmd munged (Debian: slurmd munge) and there is no apt-get to install them"


def test_missing_tools_looks_on_path_and_in_the_system_directories(monkeypatch, tmp_path):
    tool = tmp_path / "some-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_tools(["some-tool", "no-such-tool-here"]) == ["no-such-tool-here"]
    monkeypatch.setattr("needs.SYSTEM_DIRS", (str(tmp_path),))
    monkeypatch.setenv("PATH", "")
    assert missing_tools(["some-tool"]) == []  # a daemon in /usr/sbin, off a user's PATH, is found


def test_skips_with_the_reason_and_how_or_fails_when_every_test_is_required():
    with pytest.raises(pytest.skip.Exception, match=r"^needs root; run it as root$"):
        skip_or_fail("needs root", "run it as root", environ={})
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("needs root", "run it as root", environ={REQUIRE_ALL: "0"})
    with pytest.raises(pytest.fail.Exception, match=f"needs root, and {REQUIRE_ALL}=1 requires every test to run"):
        skip_or_fail("needs root", "run it as root", environ={REQUIRE_ALL: "1"})


@pytest.mark.parametrize("script", sorted(tiny_run.SERVICE_TOOLS))
def test_service_fixture_without_root_skips_or_fails_before_starting_anything(script, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tiny_run.subprocess, "run", lambda *a, **k: pytest.fail(f"started {a}"))
    monkeypatch.delenv(REQUIRE_ALL, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        with tiny_run.root_service(script, tmp_path, why="these tests start services", tests="tests/e2e/x.py"):
            pass
    message = str(skipped.value)
    assert "\n" not in message and message.startswith("these tests start services: needs root; run them as root: "
                                                       "sudo make test, or sudo ")
    assert message.endswith("-m pytest tests/e2e/x.py (CI does)")
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match=f"needs root, and {REQUIRE_ALL}=1"):
        with tiny_run.root_service(script, tmp_path, why="these tests start services", tests="tests/e2e/x.py"):
            pass


def test_ci_requires_every_test():
    with open(os.path.join(tiny_run.REPO, ".ci", "run")) as handle:
        assert f"export {REQUIRE_ALL}=1" in handle.read()
