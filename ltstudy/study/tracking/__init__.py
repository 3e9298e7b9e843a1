"""MLflow: the study run, one child run per trial written by a background writer, reading a study back."""
