"""Drivers that run many trials and print tables: ``compare`` (the README's results) and the benchmarks."""
