"""Many models in one run: the jobs planned, each model's options checked (``jobs``),
then run, each its own conversion, their shards on one queue (``run``).
"""
