"""What to try next and when to stop: the search space, Optuna inside Tune, early stopping, concurrency."""
