"""`megacoca plan`: which layout trains a CoCa fastest without running out of memory (issue 11).

Prediction only, from models, config and parallel (never the trainer; measuring real runs is megacoca.profiling):
params.py (what a rank holds, from the meta-device build), memory.py (peak memory per rank), comm.py (the
tensor-parallel collectives, held to what the layers issue by tests/unit/plan/test_comm.py), timing.py (step time
on a DeviceProfile), search.py (every valid layout, fastest first), profile.py (DeviceProfile), presets.py (the
GPU presets), fit.py (a calibration's measurements turned into a DeviceProfile), job.py (the Layout and buffers of a
train config, as the trainer derives them). Layouts are megacoca.config.layout.Layout.
"""
