"""The entry the launchers run: `python -m megacoca.train`, `deepspeed --module megacoca.train`,
`deepspeed megacoca/train.py`, `torchrun -m megacoca.train` (the same as `megacoca train`: megacoca.cli.train).

Its first act is to install the preemption watch (megacoca.launch.preemption, which imports nothing heavy), so
that a SIGUSR1/SIGTERM at any moment of the run, even while torch is being imported, ends it with
REQUEUE_EXIT_CODE and nothing lost instead of killing the rank (status 138/143, which no batch script requeues)."""

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed megacoca/train.py ...`): put the repo root, not megacoca/, first on sys.path,
    # so that megacoca's subpackages (data, config, eval, ...) cannot shadow top-level modules of those names.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megacoca.launch.preemption import PreemptionWatch  # noqa: E402  (after the sys.path fix above)

if __name__ == "__main__":
    preemption = PreemptionWatch().install()

from megacoca.cli.train import main  # noqa: E402  (heavy imports after the watch is installed)
from megacoca.launch.process_group import exit_process  # noqa: E402

if __name__ == "__main__":
    exit_process(main(preemption=preemption))
