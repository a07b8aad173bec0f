"""Starting ranks: the process group of a training run, and N ranks of one machine for measurements and tests.

`megacoca train` runs the same way under `deepspeed` (--num_gpus / --hostfile), `torchrun`, srun wrappers, or as
a plain single process, which then makes a one-rank group itself (process_group.ensure_launch_env). `ranks.py`
runs a function on N forked ranks of this machine (FileStore rendezvous): the planner's measurements, the test
suite's harness and the benchmarks all start their ranks there.
"""
