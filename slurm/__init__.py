"""The Slurm job template (`job.sbatch`), shipped as package data so `vlp submit` renders it from any install."""
