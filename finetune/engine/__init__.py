"""Engine: the fit loop, optimiser and schedule, self-contained checkpoints."""
