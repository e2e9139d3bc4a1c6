"""Every byte on disk: HF checkpoints in and out, params dirs, statistics and
score artifacts, the one atomic-write helper, model cards."""
