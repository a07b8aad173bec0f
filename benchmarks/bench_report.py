"""Markdown reporting shared by the benchmarks: the environment line every report starts with, tables, units."""

from __future__ import annotations

import datetime
import os
import platform
import sys

MB = 1e6


def environment() -> dict:
    """The command line, date, versions, CPUs and load average of this run."""
    import torch  # heavy: only when a report is printed

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        ds_version = f"unavailable ({error})"
    return {
        "command": " ".join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                             else sys.executable] + sys.argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def print_header(title: str) -> None:
    env = environment()
    print(f"\n### {title}\n")
    print(f"- command: `{env['command']}`")
    print(f"- {env['date']} | torch {env['torch']} | deepspeed {env['deepspeed']} | python {env['python']} | "
          f"{env['cpus']} CPUs ({env['machine']}), no GPU used | load average {env['loadavg']}\n")


def print_table(headers: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f}"


def millions(n: float) -> str:
    return f"{n / 1e6:,.3f}"
