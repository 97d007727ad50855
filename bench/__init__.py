"""Benchmarks. Each prints one JSON object per figure on stdout (see bench/README.md)."""
