"""How a study starts or joins Ray: a local Ray for one-worker trials starts without its dashboard (its
start costs every study 1-2 s); multi-worker trials keep it (Ray Train's placement-group cleaner needs the
State API); a cluster is joined as it is. A study's summary is drawn while Ray shuts down, and survives it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


#: a driver whose garbage holds object refs in reference cycles (as Tune's dead controller objects do), let
#: go one by one while Ray shuts down, with allocations enough for collections: a collection that frees one
#: while the core worker goes away ended the process with exit code 1 and the summary unprinted (CI, stop 26)
DRIVER = textwrap.dedent("""
    import gc, threading, time
    import ray
    from ltstudy.study.ray_session import shutdown_during

    class Holder:
        pass

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    held = []
    for i in range(3000):
        h = Holder(); h.me = h; h.ref = ray.put(i); held.append(h)
    del h

    def summary():
        stopping = next(t for t in threading.enumerate() if t.name == "ltstudy-ray-shutdown")
        assert not gc.isenabled()
        while stopping.is_alive() and held:
            held.pop()
            junk = [[] for _ in range(1000)]
            time.sleep(0.001)
        return "summary drawn"

    print(shutdown_during(summary), gc.isenabled(), flush=True)
""")


def test_the_summary_drawn_while_ray_shuts_down_is_not_cut_short(tmp_path):
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["summary", "drawn", "True"]
    assert "core worker has already been shutdown" not in done.stderr
