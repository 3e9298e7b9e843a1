"""How a study starts or joins Ray: a local Ray for one-worker trials starts without its dashboard (its
start costs every study 1-2 s); multi-worker trials keep it (Ray Train's placement-group cleaner needs the
State API); a cluster is joined as it is."""

from __future__ import annotations

import pytest

from ltstudy.study import ray_session


@pytest.mark.parametrize(("address", "dashboard", "expected"), [
    (None, False, {"address": "local", "include_dashboard": False}),
    (None, True, {"address": "local"}),
    ("127.0.0.1:6379", False, {"address": "127.0.0.1:6379"}),
])
def test_ray_init_starts_the_dashboard_only_where_it_is_needed(monkeypatch, address, dashboard, expected):
    seen = {}
    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session.ray, "init", lambda **kw: seen.update(kw))
    assert ray_session.ray_init(address, dashboard=dashboard) is True
    assert {k: seen[k] for k in ("address", "include_dashboard") if k in seen} == expected
