"""Studies: Ray Tune / Ray Train / Optuna / MLflow adapters around :func:`ltstudy.train.run_trial`.

Ray and MLflow are imported only inside this package (and lazily from the CLI), so the lower layers stay
usable without them. ``space`` needs neither.
"""
