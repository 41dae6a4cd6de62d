"""The worker side of a run: the per-worker loop, the lockstep step, in-task checkpoints, the
workers' data and the registry version a worker writes after each task."""
