"""Launching training on clusters: Slurm batch scripts and dependency chains (`megatron-eagle submit`),
and the state of a run's jobs and checkpoints (`megatron-eagle status`)."""
