"""The VQL model (design/vql.md): encoder, per-user state math and scoring.

Nothing is imported eagerly: the state math and the scorer run on numpy alone, so a ranking
backend can score without torch; only :mod:`vql.model.encoder` needs it.
"""
