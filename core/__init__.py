"""vlp's bottom layer: what every other folder may import and what imports none of them.

`registry` (name -> component, with the nearest-name hint), `config` (the strict pydantic base
every config section derives from) and `collectives` (the cross-rank helpers shared by the
objective, the trainer and the evaluators). Nothing here imports `vlp.models`, `vlp.train` or
`vlp.data_pipelines`; `tests/test_layers.py` checks that.
"""
