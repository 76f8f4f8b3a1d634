"""Training: run directories, checkpoints, metrics, and one trainer per stage."""
