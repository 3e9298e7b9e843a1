"""How many trials run at once: Tune's concurrency limiter, with the limit of this run."""

from __future__ import annotations

from ray.tune.search import ConcurrencyLimiter


class StudyConcurrency(ConcurrencyLimiter):
    """Tune's concurrency limiter whose limit is this run's, also after ``--resume``.

    Tune restores a limiter's whole state, ``max_concurrent`` included, from the experiment's searcher
    state; this one keeps the limit it was given (see ``set_max``), so a resumed study runs as wide as
    the command that resumed it asked for or the cluster allows.
    """

    def set_state(self, state: dict) -> None:
        keep = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = keep

    def set_max(self, value: int) -> None:
        self.max_concurrent = value
