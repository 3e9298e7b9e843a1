"""ltstudy: long-tailed recognition methods on one trainer, tuned at cluster scale."""

__version__ = "0.1.0"
