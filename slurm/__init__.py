"""`vlp.slurm`: Slurm submission in three parts, one file each (the cluster profile `profile.py`,
the script `render.py` from the template `job.sbatch`, shipped as package data, and the submission
`submit.py`), plus `vlp status` (`status.py`) and the local test cluster (`local_cluster.sh`)."""
