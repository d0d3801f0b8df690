"""Benchmarks: ``python -m bench``. Each figure is reported beside a baseline measured in the same run."""
