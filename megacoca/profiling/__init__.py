"""Measuring real runs for the planner: the floor above the trainer that megacoca.plan's predictions are held to.

memory_tracker.py counts a device's live tensor memory by what holds it; measure.py runs real Trainer steps of a
layout on forked gloo ranks (megacoca.launch.ranks) and reports each rank's peak memory and step time;
calibrate.py (with calibrate_rank.py, what one rank measures) measures this machine for `megacoca plan
--calibrate`, and megacoca.plan.fit turns the numbers into a DeviceProfile; collectives.py counts the collectives
the tensor-parallel layers really issue (meta device, fake process group) for the planner's analytic count to be
checked against. megacoca.plan itself never imports this package: it predicts from models, config and parallel.
"""
