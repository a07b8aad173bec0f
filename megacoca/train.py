"""The entry the launchers run: `python -m megacoca.train`, `deepspeed --module megacoca.train`,
`deepspeed megacoca/train.py`, `torchrun -m megacoca.train` (the same as `megacoca train`: megacoca.cli.train)."""

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed megacoca/train.py ...`): put the repo root, not megacoca/, first on sys.path,
    # so that megacoca's subpackages (data, config, eval, ...) cannot shadow top-level modules of those names.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megacoca.cli.train import main  # noqa: E402  (after the sys.path fix above)
from megacoca.launch.process_group import exit_process  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
