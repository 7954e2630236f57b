"""Training, evaluation, export and the `vlp` command line."""
