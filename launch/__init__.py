"""Launchers: run `python -m rrt.train` locally, on a TPU VM slice, on SLURM, or as a sweep (docs/LAUNCHING.md)."""
