"""Research code around the VQL model: training data, training, the evaluation grid, the
baselines (``zoo``), offline metrics and the results report.

The worker, serving and replay never import this package (tests/test_layers.py checks it):
what they run lives in :mod:`vql.model`; only the CLI's train and evaluate commands and the
benches reach in here.
"""
