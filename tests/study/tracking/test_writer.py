"""The background MLflow writer against a local SQLite store, without Ray: order, coalescing, flushes,
retries while the store is out of reach, and the error when records could not be written; then the Tune
callback on it (fake trials): nothing blocks the controller but the flushes, and a restore writes no step
twice."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from ltstudy.errors import TrackingWriteError
from ltstudy.study.tracking.store import STATUS_TAG, client, log_batch
from ltstudy.study.tracking.study_run import StudyTracker
from ltstudy.study.tracking.writer import OpenRun, RunWriter

from support.configs import TINY

FAST = {"stall_s": 5.0, "backoff_s": (0.01, 0.05)}


class Recording:
    """An MLflow client that records every ``log_batch``, can hold writes at a gate, and fails the first
    ``fail`` calls of a method with ``error``."""

    def __init__(self, uri: str, fail: int = 0, error: Exception | None = None, method: str = "log_batch") -> None:
        self.inner, self.batches, self.calls = client(uri), [], []
        self.gate = threading.Event()
        self.gate.set()
        self.fail, self.error, self.method = fail, error, method

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.gate.wait()
            self.calls.append(name)
            if name == self.method and self.fail > 0:
                self.fail -= 1
                raise self.error
            if name == "log_batch":
                self.batches.append((args[0], [(m.key, m.step) for m in kwargs.get("metrics", [])],
                                     {t.key: t.value for t in kwargs.get("tags", [])}))
            return attr(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one takes seconds); each test has its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('writer') / 'mlflow.db'}"


@pytest.fixture
def store(store_uri, request):
    mlc = MlflowClient(store_uri)
    return SimpleNamespace(uri=store_uri, mlc=mlc, experiment=mlc.create_experiment(request.node.name))


class Hold(threading.Event):
    """Holds the writer thread inside an ``open`` until set; ``inside()`` waits until the thread is there,
    so that every record submitted after it is in the thread's next window, whatever the scheduling."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()

    def inside(self) -> None:
        assert self.entered.wait(30), "the writer thread never started the open"


def _creator(store, name: str, hold: Hold | None = None):
    def create(mlc) -> OpenRun:
        if hold is not None:
            hold.entered.set()
            hold.wait()
        return OpenRun(mlc.create_run(store.experiment, run_name=name).info.run_id)
    return create


def _step(step: int, names=("loss", "acc")) -> list[Metric]:
    return [Metric(n, float(step), 1000 + step, step) for n in names]


def _steps(mlc, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in sorted(mlc.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_queued_epochs_of_a_run_are_coalesced_and_kept_in_order(store):
    rec = None

    def factory(uri):
        nonlocal rec
        rec = Recording(uri)
        return rec

    writer, hold = RunWriter(store.uri, client_factory=factory, **FAST), Hold()
    writer.open("a", _creator(store, "a", hold))  # the writer waits here while ten epochs queue up
    hold.inside()
    for step in range(1, 11):
        writer.log("a", step, _step(step), {"node_id": f"n{step}"})
    hold.set()
    assert writer.flush("a")
    run_id = writer.run("a").run_id
    assert len(rec.batches) == 1  # ten records, one call
    assert [s for _, metrics, _ in rec.batches for k, s in metrics if k == "loss"] == list(range(1, 11))
    assert rec.batches[0][2] == {"node_id": "n10"}  # tags merged in order: the last value wins
    assert _steps(store.mlc, run_id) == list(range(1, 11))
    assert store.mlc.get_run(run_id).data.tags["node_id"] == "n10"
    writer.close()


def test_a_coalesced_batch_respects_mlflows_limits(store):
    rec = None

    def factory(uri):
        nonlocal rec
        rec = Recording(uri)
        return rec

    writer, hold = RunWriter(store.uri, client_factory=factory, **FAST), Hold()
    writer.open("a", _creator(store, "a", hold))
    hold.inside()
    names = [f"m{i}" for i in range(150)]
    for step in range(1, 11):  # 1500 metrics: two calls of at most 1000
        writer.log("a", step, _step(step, names))
    hold.set()
    writer.close()
    assert [len(metrics) for _, metrics, _ in rec.batches] == [1000, 500]
    assert _steps(store.mlc, writer.run("a").run_id, "m149") == list(range(1, 11))


def test_log_batch_uses_as_few_calls_as_the_limits_allow():
    sizes = []

    class Counting:
        def log_batch(self, run_id, metrics, params, tags):
            sizes.append((len(metrics), len(params), len(tags)))

    metrics = [Metric(f"m{i}", 1.0, 0, 0) for i in range(2500)]
    calls = log_batch(Counting(), "r", metrics=metrics, params={f"p{i}": i for i in range(250)},
                      tags={f"t{i}": i for i in range(130)})
    assert calls == len(sizes) == 3
    assert all(p <= 100 and t <= 100 and m + p + t <= 1000 for m, p, t in sizes)
    assert [sum(col) for col in zip(*sizes, strict=True)] == [2500, 250, 130]
    assert log_batch(Counting(), "r") == 0


def test_each_runs_records_stay_in_order_and_a_flush_returns_once_its_run_is_written(store):
    writer, hold_a, hold_b = RunWriter(store.uri, **FAST), Hold(), Hold()
    writer.open("a", _creator(store, "a", hold_a))  # everything below queues behind this
    hold_a.inside()
    writer.log("a", 1, _step(1))
    writer.open("b", _creator(store, "b", hold_b))
    writer.log("b", 1, _step(1))
    for step in range(2, 4):  # interleaved with b's records, which come after a's first one
        writer.log("a", step, _step(step))
        writer.log("b", step, _step(step))
    ended = []
    writer.call("a", lambda mlc, run: (mlc.set_terminated(run.run_id, "FINISHED"), ended.append("a")), "end")
    hold_a.set()
    try:
        assert writer.flush("a")  # while b's run cannot even be created yet
        a = store.mlc.get_run(writer.run("a").run_id)
        assert a.info.status == "FINISHED" and ended == ["a"] and _steps(store.mlc, a.info.run_id) == [1, 2, 3]
        assert writer.run("b") is None
    finally:
        hold_b.set()
    assert writer.flush()
    assert _steps(store.mlc, writer.run("b").run_id) == [1, 2, 3]
    writer.close()


def test_a_restored_run_gets_only_the_steps_after_its_last_logged_one(store):
    writer = RunWriter(store.uri, **FAST)
    run_id = store.mlc.create_run(store.experiment).info.run_id
    old = store.mlc.create_run(store.experiment).info.run_id
    writer.open("r", lambda mlc: OpenRun(run_id, logged=2))
    writer.open("e", lambda mlc: OpenRun(old, ended=True))
    for step in (1, 2, 3, 3, 4):  # 3 twice: a trial restarted in this process replays it
        writer.log("r", step, _step(step))
        writer.log("e", step, _step(step))
    writer.call("e", lambda mlc, run: mlc.set_terminated(run.run_id, "FAILED"), "end")
    writer.close()
    assert _steps(store.mlc, run_id) == [3, 4]
    assert _steps(store.mlc, old) == [] and store.mlc.get_run(old).info.status == "RUNNING"


@pytest.mark.parametrize("error", [MlflowException("connection refused"), ConnectionError("reset by peer")])
def test_a_store_out_of_reach_is_retried_in_order_and_nothing_is_dropped(store, error):
    rec = None

    def factory(uri):
        nonlocal rec
        rec = Recording(uri, fail=3, error=error)
        return rec

    writer = RunWriter(store.uri, client_factory=factory, **FAST)
    writer.open("a", _creator(store, "a"))
    for step in range(1, 6):
        writer.log("a", step, _step(step))
    writer.call("a", lambda mlc, run: mlc.set_terminated(run.run_id, "FINISHED"), "end")
    writer.close()  # raises if anything was lost
    assert rec.calls.count("log_batch") >= 4 and rec.calls[-1] == "set_terminated"
    run = store.mlc.get_run(writer.run("a").run_id)
    assert _steps(store.mlc, run.info.run_id) == [1, 2, 3, 4, 5] and run.info.status == "FINISHED"


def test_a_rejected_record_is_counted_and_later_ones_are_written(store):
    rejected = MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
    writer = RunWriter(store.uri, client_factory=lambda uri: Recording(uri, fail=1, error=rejected), **FAST)
    hold = Hold()
    writer.open("a", _creator(store, "a", hold))
    hold.inside()
    writer.open("b", lambda mlc: (_ for _ in ()).throw(rejected))  # its run cannot be created
    writer.log("a", 1, _step(1))
    writer.log("a", 2, _step(2))  # coalesced with step 1: one rejected call, two records
    writer.log("b", 1, _step(1))
    hold.set()
    assert writer.flush("a")
    writer.log("a", 3, _step(3))
    with pytest.raises(TrackingWriteError, match=r"^4 MLflow record\(s\) were not written to sqlite:.*: bad value$"):
        writer.close()  # a's steps 1 and 2, b's run and b's step
    assert _steps(store.mlc, writer.run("a").run_id) == [3]
    assert TrackingWriteError.exit_code == 1


def test_a_store_that_stays_down_ends_in_a_one_line_error_within_the_stall_bound(store):
    down = MlflowException("API request to http://127.0.0.1:9 failed: connection refused")
    writer = RunWriter(store.uri, stall_s=0.5, backoff_s=(0.01, 0.05),
                       client_factory=lambda uri: Recording(uri, fail=10**9, error=down, method="create_run"))
    writer.open("a", _creator(store, "a"))
    for step in range(1, 4):
        writer.log("a", step, _step(step))
    tic = time.monotonic()
    assert not writer.flush("a")
    with pytest.raises(TrackingWriteError) as err:
        writer.close()
    assert time.monotonic() - tic < 5
    message = str(err.value)
    assert message.startswith("4 MLflow record(s) were not written") and "connection refused" in message
    assert "\n" not in message
    assert writer._thread.daemon  # a writer stuck on a dead store never keeps the process alive


# ------------------------------------------------------------------------------------ the Tune callback
def _trial(tid: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={**TINY, "method": "ce", "epochs": 3, **config},
                           last_result=None, checkpoint=None, get_error=lambda: None)


def _result(epoch: int, checkpoint: bool = False) -> dict:
    out = {"epoch": epoch, "epochs_total": 3, "train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch,
           "val_top1": 0.1 * epoch, "node_id": "n1"}
    if checkpoint:
        out["should_checkpoint"] = True
    if epoch == 3:
        out.update(val_per_class=[0.5, 0.5, 0.25, 0.0], test_per_class=[0.5, 0.25, 0.25, 0.0])
    return out


def _callback(store_uri: str, parent: str, experiment: str, echo=None):
    from ltstudy.study.tracking.callback import MLflowTrialCallback

    return MLflowTrialCallback(store_uri, experiment, parent, "s", echo=echo, objectives=("val_top1",))


def _call(fn, *args, wait: float = 10.0) -> threading.Thread:
    """``fn(*args)`` on a thread of its own, joined for up to ``wait`` seconds."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    thread.join(wait)
    return thread


def test_tune_keeps_a_results_objectives_and_the_end_record_gets_every_metric(store_uri):
    """Tune's trial state (written for every trial at every experiment save) keeps the objectives, ``epoch`` and
    Tune's own keys of a result; the callback keeps the rest for the trial's end record."""
    tracker = StudyTracker(store_uri, "aside")
    parent = tracker.open({}, resume=False)
    ended = {}
    cb = _callback(store_uri, parent, tracker.experiment_id, lambda tid, outcome, last: ended.update(last))
    trial = _trial("t1")
    cb.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        result = {**_result(epoch), "done": epoch == 3, "training_iteration": epoch,
                  "train_placement_group": "a1b2"}  # a multi-worker trial's group, read back by the reaper
        cb.on_trial_result(0, [], trial, result)
        assert set(result) == {"epoch", "epochs_total", "val_top1", "node_id", "done", "training_iteration",
                               "train_placement_group"}
        trial.last_result = result
    cb.on_trial_complete(0, [], trial)
    cb.close()
    assert ended["val_loss"] == pytest.approx(2 / 3) and ended["train_loss"] == pytest.approx(1 / 3)
    assert ended["val_per_class"] == [0.5, 0.5, 0.25, 0.0]
    mlc = MlflowClient(store_uri)
    run_id = cb.writer.run("t1").run_id
    assert _steps(mlc, run_id, "val_loss") == [1, 2, 3] and "per_class_accuracy.json" in {
        a.path for a in mlc.list_artifacts(run_id)}


def test_the_callback_waits_only_when_tune_saves_its_state_and_at_trial_ends(store_uri):
    uri = store_uri
    tracker = StudyTracker(uri, "s")
    parent = tracker.open({}, resume=False)
    gate, seen = threading.Event(), {}

    def echo(tid, outcome, last):  # the end line: the record must be complete by now
        run = MlflowClient(uri).search_runs([tracker.experiment_id], f"tags.`ltstudy.trial_id` = '{tid}'")[0]
        seen.update(status=run.info.status, tag=run.data.tags[STATUS_TAG], outcome=outcome,
                    steps=_steps(MlflowClient(uri), run.info.run_id, "val_loss"))

    cb = _callback(uri, parent, tracker.experiment_id, echo)
    cb._writer = RunWriter(uri, client_factory=lambda u: _gated(u, gate), stall_s=60)
    trial = _trial("t1")
    # the store does not answer: the hooks that need no flush return anyway, a checkpoint's result too
    assert not _call(cb.on_trial_start, 0, [], trial).is_alive()
    assert not _call(cb.on_trial_result, 0, [], trial, _result(1)).is_alive()
    assert not _call(cb.on_trial_result, 0, [], trial, _result(2, checkpoint=True)).is_alive()
    waiting = _call(cb.get_state, wait=2.0)
    assert waiting.is_alive()  # Tune saves the state a resume restarts from: epochs 1 and 2 are written first
    gate.set()
    waiting.join(30)
    assert not waiting.is_alive()
    run_id = cb.writer.run("t1").run_id
    assert _steps(MlflowClient(uri), run_id, "val_loss") == [1, 2]
    cb.on_trial_result(0, [], trial, _result(3, checkpoint=True))
    trial.last_result = _result(3)
    cb.on_trial_complete(0, [], trial)
    assert seen == {"status": "FINISHED", "tag": "completed", "outcome": "completed", "steps": [1, 2, 3]}
    cb.close()
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["method"] == "ce" and run.data.tags["ltstudy.epochs"] == "3"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"config.yaml", "per_class_accuracy.json"} <= artifacts

    # a resumed study: a new callback finds the runs by tag; the ended trial is replayed from its final
    # checkpoint and left alone; a trial restored mid-way logs only the epochs after its last logged one
    partial = _trial("t2", seed=1)
    cb.on_trial_start(0, [], partial)
    cb.on_trial_result(0, [], partial, _result(1, checkpoint=True))
    cb.on_trial_result(0, [], partial, _result(2))
    cb.close()
    lines = []
    again = _callback(uri, parent, tracker.experiment_id, lambda tid, outcome, last: lines.append(tid))
    for t in (trial, partial):
        again.on_trial_start(0, [], t)
    again.on_trial_result(0, [], trial, _result(3, checkpoint=True))
    trial.last_result = _result(3)
    again.on_trial_complete(0, [], trial)
    for epoch in (2, 3):
        again.on_trial_result(0, [], partial, _result(epoch, checkpoint=True))
    partial.last_result = _result(3)
    again.on_trial_complete(0, [], partial)
    again.close()
    mlc = MlflowClient(uri)
    runs = mlc.search_runs([tracker.experiment_id], "tags.`ltstudy.role` = 'trial'")
    assert sorted(r.data.tags["ltstudy.trial_id"] for r in runs) == ["t1", "t2"]
    for r in runs:
        assert _steps(mlc, r.info.run_id, "val_loss") == [1, 2, 3] and r.info.status == "FINISHED"
    assert lines == ["t2"]  # no second end line for the trial that had ended


def _gated(uri: str, gate: threading.Event) -> Recording:
    rec = Recording(uri)
    rec.gate = gate
    return rec


def test_the_callback_pickles_without_its_writer(store_uri):
    import pickle

    uri = store_uri
    tracker = StudyTracker(uri, "p")
    cb = _callback(uri, tracker.open({}, resume=False), tracker.experiment_id)
    cb.on_trial_start(0, [], _trial("t1"))
    copy = pickle.loads(pickle.dumps(cb))
    assert copy._writer is None and copy.uri == uri
    cb.close()


def test_a_fresh_study_creates_its_trials_runs_without_searching_and_a_restored_one_finds_them(store_uri,
                                                                                               monkeypatch):
    """Finding a trial's run by tag is an SQL search that grows with the runs (15 % of the writer thread at
    400 trials); a study started afresh has no run to find. Its pickled callback (what Tune restores on
    ``--resume``) searches again, and finds the run instead of making a second one."""
    import pickle

    from mlflow.tracking import MlflowClient as Client

    from ltstudy.study.tracking.callback import MLflowTrialCallback

    searches = []
    real = Client.search_runs
    monkeypatch.setattr(Client, "search_runs", lambda self, *a, **k: searches.append(a) or real(self, *a, **k))
    tracker = StudyTracker(store_uri, "fresh")
    parent = tracker.open({}, resume=False)
    searches.clear()
    cb = MLflowTrialCallback(store_uri, tracker.experiment_id, parent, "fresh", fresh=True)
    cb.on_trial_start(0, [], _trial("t1"))
    cb.on_trial_result(0, [], _trial("t1"), {**_result(1), "done": False})
    cb.writer.flush("t1")
    first = cb.writer.run("t1").run_id
    restored = pickle.loads(pickle.dumps(cb))
    cb.close()
    assert searches == [] and restored.fresh is False
    restored.on_trial_start(0, [], _trial("t1"))
    restored.writer.flush("t1")
    assert restored.writer.run("t1").run_id == first and len(searches) == 1
    restored.close()
    assert len(MlflowClient(store_uri).search_runs([tracker.experiment_id], "tags.`ltstudy.trial_id` = 't1'")) == 1
