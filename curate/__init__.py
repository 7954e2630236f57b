"""`vlp.curate`: what to train on. `vlp embed` scores and embeds every sample of a set of shards
(`embed.py`); `vlp curate` filters, deduplicates and balances them from those embeddings and
writes new shards with a report and a manifest (`run.py`, the filters in `filters.py`, their
config in `config.py`). Nothing in vlp imports this package except the command line."""
