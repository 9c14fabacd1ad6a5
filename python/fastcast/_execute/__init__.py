"""Where shards are written: one queue of shard jobs for every model of a run, on
this machine (``queue``) or as Ray tasks (``ray_pool``).
"""
