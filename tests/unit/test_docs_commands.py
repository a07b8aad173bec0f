"""Every command the README and the docs show is one that runs: its subcommand exists, its flags and their
choices are the command's own, and a training command's recipe, config keys and values resolve.

The commands come from the fenced shell blocks of README.md, docs/*.md and slurm/README.md, and from the inline
code spans of those files that start with a command. Running them for real would take hours, so each is checked
the cheap way:
- `megacoca ...` and the launchers of `megacoca.train` (`python -m megacoca[.train]`, `deepspeed --module`,
  `torchrun -m`, `sbatch slurm/*.sbatch`): the subcommand's `--help` (in this process), every `--flag` of the
  command in it, and a value among its choices where it lists them; a `train` command of a fenced block is also
  run with `--print-config` (recipe, `--config`, `--set` keys and types), unless it names a file the docs make
  first (`--config base.yaml` after `megacoca plan --emit-config`) or holds a placeholder;
- `python scripts/*.py` (benchmarks/, kernels/ alike), `python -m megacoca_kernels.*`: the same from the script's
  `--help` (a subprocess each, once per script and subcommand);
- `make TARGET`: a target of the Makefile; `VAR=... bash scripts/demo.sh` (or `make demo`): every variable is one
  demo.sh reads, and its `EXTRA_SETS` resolve on the demo's recipe (`--print-config`);
- any repository path a command names (scripts/, slurm/, tests/, benchmarks/, ds_configs/, kernels/) exists.
Commands of other tools (pytest, tensorboard, DeepSpeed's own scripts) are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from megacoca.cli import main as megacoca_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))),
        "slurm/README.md"]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
REPO_DIRS = ("scripts/", "slurm/", "tests/", "benchmarks/", "ds_configs/", "kernels/")
SCRIPT_DIRS = ("scripts/", "benchmarks/", "kernels/")
# What a command line starts with (after VAR=value assignments); other lines of a block (a file listing) are not
COMMAND_START = re.compile(r"([A-Za-z_]\w*=\S+ )*(megacoca |(\S*/)?python |deepspeed |torchrun |sbatch |make |bash )")
DEMO_RECIPE = "coca_tiny_shapes"


def _shell_lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def _split_commands(line: str) -> list[str]:
    """`a; b && c`, `x=$(cmd)`: each command of a shell line on its own."""
    inner = re.findall(r"\$\(([^()]*)\)", line)
    outer = re.sub(r"\$\([^()]*\)", "SUBST", line)
    parts = re.split(r";|&&|\|\||\|", outer)
    return [p.strip() for p in [*parts, *inner] if p.strip()]


def _commands_of(path: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, command, from a fenced block) for every command-like text of one doc."""
    with open(os.path.join(REPO, path)) as handle:
        text = handle.read()
    found = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL_LANGUAGES:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        for offset, line in enumerate(_shell_lines(block.group(2))):
            for command in _split_commands(line):
                if COMMAND_START.match(command + " "):
                    found.append((path, first_line + offset, command, True))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in re.finditer(r"`([^`]+)`", prose):
        command = " ".join(span.group(1).split())
        if COMMAND_START.match(command + " "):
            found.append((path, text.count("\n", 0, span.start()) + 1, command, False))
    return found


def _all_commands():
    return [c for path in DOCS for c in _commands_of(path)]


def _words(command: str) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments, then the words; `...` and the brackets of `[--optional flags]` dropped."""
    words = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, [w for w in words if w != "..."]


def _megacoca_argv(words: list[str]) -> list[str] | None:
    """The `megacoca` argv a command runs (a launcher replaced by the module it starts), or None."""
    if words and words[0].endswith("python"):
        words = words[1:]
        if words[:2] == ["-m", "megacoca"]:
            return words[2:]
        if words[:2] == ["-m", "megacoca.train"]:
            return ["train", *words[2:]]
        return None
    if words[:1] == ["megacoca"]:
        return words[1:]
    if words[:1] in (["deepspeed"], ["torchrun"]):
        for i, word in enumerate(words):
            if word in ("--module", "-m") and words[i + 1:i + 2] == ["megacoca.train"]:
                return ["train", *words[i + 2:]]
            if word == "megacoca/train.py":
                return ["train", *words[i + 1:]]
        return None
    if words[:1] == ["sbatch"]:
        for i, word in enumerate(words):
            if word.startswith("slurm/") and word.endswith(".sbatch"):
                return ["train", *words[i + 1:]]  # the batch scripts pass everything after them to megacoca.train
    return None


def _script_argv(words: list[str]) -> list[str] | None:
    """`python scripts/x.py ARGS` (or benchmarks/, kernels/), `python -m megacoca_kernels.bench ARGS`."""
    if not words or not words[0].endswith("python"):
        return None
    if len(words) > 1 and words[1].startswith(SCRIPT_DIRS) and words[1].endswith(".py"):
        return words[1:]
    if words[1:3] and words[1] == "-m" and words[2].startswith("megacoca_kernels"):
        return words[1:]
    return None


def _subcommand_words(args: list[str]) -> list[str]:
    """The leading words before the first option: the subcommand path (`convert reshape`), or positionals."""
    words = []
    for arg in args:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


@functools.lru_cache(maxsize=None)
def _megacoca_help(words: tuple[str, ...]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = megacoca_main([*words, "--help"])
    return code, out.getvalue() + err.getvalue()


@functools.lru_cache(maxsize=None)
def _script_help(words: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
    done = subprocess.run([sys.executable, *words, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def _check_flags(args: list[str], help_text: str) -> list[str]:
    """Problems with the `--flags` of `args` against a command's --help text: unknown flags, values not among
    the choices the help lists (`--flag {a,b}`)."""
    problems = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, _, inline = arg.partition("=")
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
            problems.append(f"unknown flag {flag}")
            continue
        choices = re.search(rf"(?<![\w-]){re.escape(flag)} \{{([^}}]*)\}}", help_text)
        if not choices:
            continue
        allowed = choices.group(1).split(",")
        values = [inline] if inline else []
        for value in ([] if inline else args[i + 1:]):
            if value.startswith("-"):
                break
            values.append(value)
        problems += [f"{flag} {value}: not one of {allowed}" for value in values if value not in allowed]
    return problems


def _print_config(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = megacoca_main([*argv, "--print-config"])
    return code, err.getvalue().strip()


def _concrete(args: list[str]) -> bool:
    """No placeholder (`--set seed=N`, `FILE`) and no file the docs make first: --print-config can resolve it."""
    for i, arg in enumerate(args):
        if re.search(r"(^|=)[A-Z][A-Z_]*$", arg) or "<" in arg:
            return False
        if i and args[i - 1] == "--config" and not os.path.isfile(os.path.join(REPO, arg)):
            return False
    return True


def _make_targets() -> set[str]:
    with open(os.path.join(REPO, "Makefile")) as handle:
        return set(re.findall(r"^([\w-]+):", handle.read(), re.M))


def _demo_variables() -> set[str]:
    with open(os.path.join(REPO, "scripts", "demo.sh")) as handle:
        return set(re.findall(r"\$\{(\w+)", handle.read()))


def problems_of(command: str, fenced: bool) -> list[str]:
    """What is wrong with one doc command (empty: it runs)."""
    env, words = _words(command)
    problems = [f"{w} does not exist" for w in words
                if w.startswith(REPO_DIRS) and not glob.glob(os.path.join(REPO, w.rstrip("/")))]
    argv = _megacoca_argv(words)
    if argv is not None:
        code, help_text = _megacoca_help(tuple(_subcommand_words(argv)))
        if code != 0:
            return problems + [f"`megacoca {' '.join(_subcommand_words(argv))} --help` failed: {help_text.strip()}"]
        problems += _check_flags(argv, help_text)
        if fenced and argv[:1] == ["train"] and not problems and _concrete(argv):
            code, error = _print_config(argv)
            if code != 0:
                problems.append(f"--print-config: {error}")
        return problems
    script = _script_argv(words)
    if script is not None:
        head = script[:2] if script[0] == "-m" else script[:1]
        rest = script[len(head):]
        code, help_text = _script_help(tuple(head + _subcommand_words(rest)))
        if code != 0:
            return problems + [f"`python {' '.join(head)} --help` failed: {help_text.strip()[-500:]}"]
        return problems + _check_flags(rest, help_text)
    if words[:1] == ["make"]:
        problems += [f"no make target {t}" for t in words[1:] if "=" not in t and t not in _make_targets()]
    if words[:2] == ["bash", "scripts/demo.sh"] or words[:2] == ["make", "demo"]:
        problems += [f"scripts/demo.sh reads no {name}" for name in env if name not in _demo_variables()]
        sets = shlex.split(env.get("EXTRA_SETS", ""))
        recipe = env.get("RECIPE", DEMO_RECIPE)
        if sets and _concrete(sets):
            code, error = _print_config(["train", "--recipe", recipe, *sets])
            if code != 0:
                problems.append(f"EXTRA_SETS on {recipe}: {error}")
    return problems


COMMANDS = _all_commands()


@pytest.mark.parametrize("path, line, command, fenced", COMMANDS,
                         ids=[f"{path}:{line}" for path, line, _, _ in COMMANDS])
def test_doc_command_runs(path, line, command, fenced):
    assert problems_of(command, fenced) == [], f"{path}:{line}: {command}"


def test_the_docs_show_commands():
    """The extraction finds what it should (a change of fence style must not silently empty the test)."""
    shown = {path for path, _, _, fenced in COMMANDS if fenced}
    assert {"README.md", "slurm/README.md", "docs/benchmarks.md"} <= shown
    assert sum(1 for c in COMMANDS if _megacoca_argv(_words(c[2])[1]) is not None) >= 20


@pytest.mark.parametrize("command, expected", [
    ("megacoca train --recipe coca_base --print-config", "unknown recipe"),
    ("sbatch -t 4:00:00 slurm/train_srun.sbatch --recipe coca_base --train-shards /data/train", "unknown recipe"),
    ("megacoca train --recipe coca_tiny_cpu --set optim.no_such_key=1", "no_such_key"),
    ("megacoca convert reshap --input x --output y", "invalid choice"),
    ("megacoca plan --flavor coca_base --cluster h100 --gpu 8", "unknown flag --gpu"),
    ("megacoca eval --checkpoint c --shards s --tokenizer t --no-such-flag", "unknown flag --no-such-flag"),
    ("python benchmarks/learning_ablations.py --variants paper no_such_variant", "no_such_variant: not one of"),
    ("python scripts/no_such_script.py --help", "does not exist"),
    ("make no-such-target", "no make target"),
    ("NO_SUCH_VAR=1 bash scripts/demo.sh", "reads no NO_SUCH_VAR"),
    ("NO_SUCH_VAR=1 make demo", "reads no NO_SUCH_VAR"),
    ('EXTRA_SETS="--set optim.no_such_key=1" bash scripts/demo.sh', "no_such_key"),
])
def test_a_broken_command_is_caught(command, expected):
    assert any(expected in problem for problem in problems_of(command, fenced=True)), problems_of(command, True)
