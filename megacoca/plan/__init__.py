"""`megacoca plan`: which layout trains a CoCa fastest without running out of memory (issue 11)."""
