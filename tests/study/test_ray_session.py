"""How a study starts or joins Ray: a local Ray for one-worker trials starts without its dashboard (its
start costs every study 1-2 s); multi-worker trials keep it (Ray Train's placement-group cleaner needs the
State API); a cluster is joined as it is. A study's summary is drawn while Ray shuts down, and survives it;
a local Ray stops without waiting a second for its autoscaler monitor."""

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


#: a local Ray stopped the way a study stops it, with Ray's own kill step watched: the autoscaler monitor
#: must already be gone when Ray gets to it (else Ray's SIGTERM waits out its one second: the monitor's
#: handler reports to the GCS Ray has just stopped)
STOPPER = textwrap.dedent("""
    import ray
    from ray._private import node, ray_constants
    from ltstudy.study.ray_session import ray_init, stop_ray

    seen = {}
    kill = node.Node._kill_process_impl

    def watched(self, process_type, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_MONITOR:
            seen["alive"] = [p.process.poll() is None for p in self.all_processes[process_type]]
        return kill(self, process_type, **kwargs)

    node.Node._kill_process_impl = watched
    assert ray_init(None, dashboard=False)
    monitor = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
    assert monitor.poll() is None
    stop_ray()
    print(seen, monitor.poll() is not None, ray.is_initialized(), flush=True)
""")


def test_a_local_ray_is_stopped_without_waiting_for_its_autoscaler_monitor(tmp_path):
    done = subprocess.run([sys.executable, "-c", STOPPER], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "{'alive': [False]} True False", done.stdout
