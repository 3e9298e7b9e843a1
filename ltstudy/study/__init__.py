"""Studies: Ray Tune + Optuna + MLflow around :func:`ltstudy.train.run_trial`.

The main line lives here, at the root, in the order a study runs: ``options`` (what the user asked for,
saved for ``--resume``) → ``plan`` (every check, nothing written) → ``run`` (prepare, fit, summarise) →
``trainable`` (the Tune trial: one worker, or Ray Train DDP), with ``progress``, ``callbacks``, ``startup``,
``confirm``, ``checks``, ``data``, ``storage`` and ``ray_session`` beside it. Each outside system has a
sub-package:

* ``search/``: what to try next and when to stop (space, Optuna searcher, schedulers, concurrency);
* ``tracking/``: MLflow (the study run, one child run per trial, its background writer, reading back);
* ``cluster/``: a Ray cluster (trial shapes, node checks, placement, the cluster-launcher file);
* ``results/``: which trial a study recommends and how it is shown (selection, export, catalog, report).

Import rule (``tests/test_layers.py``): the sub-packages form a chain ``search`` → ``tracking`` → ``results``
(each imports only those before it), ``cluster`` stands beside them and imports none; no sub-package
imports the root; the root imports them all. ``_compat`` (every Ray / Optuna private) imports nothing of
the study, and anyone in it may import it.
"""
