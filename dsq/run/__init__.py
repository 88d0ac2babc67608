"""A run on disk: checkpoints (save, load, verify), the run directory's lock and resume
rules, resharding, and the run's provenance."""
