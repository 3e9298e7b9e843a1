"""Drivers that run many trials and print tables: ``compare`` (the results in the docs) and the benchmarks."""
