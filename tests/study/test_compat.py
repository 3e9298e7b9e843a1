"""Every Ray / Optuna private ltstudy touches (``ltstudy.study._compat``), one test per touch on the installed
versions, so an upgrade that moves one fails here by name; and the classes a saved study names by path."""

from __future__ import annotations

import importlib
import inspect
import json
import os

import optuna
import pytest
import ray.tune

from ltstudy.study import _compat
from ltstudy.study.search.schedulers import make_scheduler
from ltstudy.study.search.searcher import LtOptunaSearch, make_searcher
from ltstudy.study.search.space import load_space

from support.servers import REPO


@pytest.mark.parametrize("path", _compat.PICKLED)
def test_every_pickled_class_lives_at_its_contract_path(path):
    module, name = path.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{path} moved: saved studies name it by this path (see _compat.PICKLED)"
    assert (obj.__module__, obj.__qualname__) == (module, name)


@pytest.fixture
def searcher(tmp_path) -> LtOptunaSearch:
    space = load_space(REPO / "search_spaces" / "ce.yaml").with_fixed({"epochs": 2})
    s = make_searcher(space, "random", 0, 4, "compat", str(tmp_path / "optuna.journal"), fresh=True)
    assert s.suggest("t0") is not None
    return s


def test_optuna_search_internals(searcher):
    trials = _compat.optuna_trials(searcher)
    assert isinstance(trials, dict) and isinstance(trials["t0"], optuna.Trial), "OptunaSearch._ot_trials"
    assert isinstance(_compat.completed_trials(searcher), set), "OptunaSearch._completed_trials"
    assert _compat.enqueued_points(searcher) and isinstance(_compat.enqueued_points(searcher)[0], dict), \
        "OptunaSearch._points_to_evaluate"
    assert isinstance(_compat.searcher_study(searcher), optuna.Study), "OptunaSearch._ot_study"


def test_optuna_storage_trial_id_and_finished(searcher):
    study, trial = _compat.searcher_study(searcher), _compat.optuna_trials(searcher)["t0"]
    frozen = study.get_trials(deepcopy=False)[0]
    assert _compat.storage_trial_id(trial) == _compat.storage_trial_id(frozen), "Trial._trial_id"
    assert not _compat.trial_finished(study, trial), "Study._storage.get_trial"
    study.tell(trial, 0.5)
    assert _compat.trial_finished(study, trial)


def test_tuner_run_config_and_search_alg(tmp_path):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = BasicVariantGenerator()
    tuner = ray.tune.Tuner(lambda config: None, tune_config=ray.tune.TuneConfig(search_alg=search, num_samples=1),
                           run_config=ray.tune.RunConfig(storage_path=str(tmp_path), callbacks=[]))
    assert isinstance(_compat.tuner_run_config(tuner), ray.tune.RunConfig), "Tuner._local_tuner.get_run_config"
    assert _compat.tuner_search_alg(tuner) is search, "TunerInternal._tune_config.search_alg"


def test_asha_internals(tmp_path):
    asha = make_scheduler("asha", "val_top1", "max", 8, 2, 2.0, state_dir=str(tmp_path))
    assert _compat.asha_budget(asha) == ("epoch", 8), "AsyncHyperBandScheduler._time_attr / _max_t"
    rungs = _compat.asha_rungs(asha)
    assert rungs and all(isinstance(m, (int, float)) and rec == {} for m, rec in rungs[0]), "_brackets[i]._rungs"
    rungs[0][0][1]["t0"] = 0.5
    _compat.set_asha_rungs(asha, rungs)
    assert _compat.asha_rungs(asha)[0][0][1] == {"t0": 0.5}
    _compat.set_asha_stopped(asha, 3)
    assert _compat.asha_stopped(asha) == 3 and "3" in asha.debug_string(), "AsyncHyperBandScheduler._num_stopped"


def test_forced_experiment_save(tmp_path):
    """The flag ``force_experiment_save`` sets is the one Tune's experiment-state manager saves on, whatever
    its period; it is reached through the wrapper a scheduler gets and on the controller itself."""
    from types import SimpleNamespace

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.execution.tune_controller import TuneController

    assert "_checkpoint_manager" in inspect.getsource(TuneController.__init__), "TuneController._checkpoint_manager"
    manager = _ExperimentCheckpointManager(storage=None, checkpoint_period=1e9)
    assert manager._should_force_sync_up is False, "_ExperimentCheckpointManager._should_force_sync_up"
    assert "force or self._should_force_sync_up" in inspect.getsource(manager.sync_up_experiment_state)
    controller = SimpleNamespace(_checkpoint_manager=manager)
    _compat.force_experiment_save(SimpleNamespace(_tune_controller=controller))  # TrialRunnerWrapper
    assert manager._should_force_sync_up is True
    manager._should_force_sync_up = False
    _compat.force_experiment_save(controller)
    assert manager._should_force_sync_up is True  # (the study's slow resume tests see the saves happen)
    # save_experiment_now: the trial marked for the save, then a forced save waited for
    assert "force" in inspect.signature(TuneController.checkpoint).parameters
    assert "wait" in inspect.signature(TuneController.checkpoint).parameters, "TuneController.checkpoint"
    calls = []
    fake = SimpleNamespace(_mark_trial_to_checkpoint=lambda t: calls.append(("mark", t)),
                           checkpoint=lambda force, wait: calls.append(("save", force, wait)))
    _compat.save_experiment_now(SimpleNamespace(_tune_controller=fake), "t")
    assert calls == [("mark", "t"), ("save", True, True)]
    assert "_mark_trial_to_checkpoint" in inspect.getsource(TuneController.add_trial), \
        "TuneController._mark_trial_to_checkpoint"


def test_drop_missing_checkpoints(tmp_path):
    """A restored trial's checkpoint manager forgets folders that are gone: an older one (Tune's next
    registration no longer deletes a missing path), then the latest too (the newest left is the latest)."""
    from types import SimpleNamespace

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune.experiment.trial import _TrainingRunMetadata

    metadata = _TrainingRunMetadata()
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=3))
    folders = [tmp_path / f"checkpoint_00000{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        folder.mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(folder)), {"epoch": i}))
    metadata.checkpoint_manager = manager
    trial = SimpleNamespace(run_metadata=metadata)
    assert _compat.drop_missing_checkpoints(trial) == []
    folders[0].rmdir()
    assert _compat.drop_missing_checkpoints(trial) == [str(folders[0])]
    assert [r.metrics["epoch"] for r in manager.best_checkpoint_results] == [1, 2]
    folders[2].rmdir()
    assert _compat.drop_missing_checkpoints(trial) == [str(folders[2])]
    assert manager.latest_checkpoint_result.metrics["epoch"] == 1
    folders[1].rmdir()
    assert _compat.drop_missing_checkpoints(trial) == [str(folders[1])]
    assert manager.latest_checkpoint_result is None and manager.best_checkpoint_results == []
    assert metadata.checkpoint_manager is manager and "checkpoint_manager" in metadata.get_json_state()


def test_slim_latest_checkpoint(tmp_path, monkeypatch):
    """With TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE the kept checkpoints carry no metrics, but the latest
    keeps the whole result (set before the trimming); slim_latest_checkpoint replaces that copy."""
    from types import SimpleNamespace

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult
    from ray.tune.experiment.trial import _TrainingRunMetadata

    monkeypatch.setenv("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    metadata = _TrainingRunMetadata()
    manager = metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    (tmp_path / "c").mkdir()
    manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(tmp_path / "c")),
                                                {"epoch": 1, "val_per_class": [0.5] * 100}))
    assert [r.metrics for r in manager.best_checkpoint_results] == [{}]
    assert "val_per_class" in manager.latest_checkpoint_result.metrics
    before = metadata.get_json_state()
    _compat.slim_latest_checkpoint(SimpleNamespace(run_metadata=metadata), {"epoch": 1})
    assert manager.latest_checkpoint_result.metrics == {"epoch": 1}
    assert len(metadata.get_json_state()) < len(before)  # the cached JSON was dropped


def test_scheduler_state_is_not_a_file_tune_stages_on_restore(tmp_path):
    """On restore Tune copies the experiment folder's ``*.json`` / ``*.pkl`` into its staging folder and
    uploads that folder at every save: ASHA's rungs must not be such a file, or the copy from resume time
    overwrites the live rungs at every save (see schedulers.STATE_FILE)."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from ltstudy.study.search.schedulers import STATE_FILE

    source = inspect.getsource(_ExperimentCheckpointManager.sync_down_experiment_state)
    assert 'path.endswith(".json") or path.endswith(".pkl")' in source, "what Tune stages on restore changed"
    assert not STATE_FILE.endswith((".json", ".pkl"))
    asha = make_scheduler("asha", "val_top1", "max", 8, 2, 2.0, state_dir=str(tmp_path))
    asha._save()
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_placement_group_from_its_hex_id():
    from ray._raylet import PlacementGroupID

    hex_id = os.urandom(PlacementGroupID.size()).hex()
    assert _compat.placement_group(hex_id).id.hex() == hex_id, "ray._raylet.PlacementGroupID"


def test_worker_node_starter_arguments_exist():
    """What start_worker_node passes (tests start loopback worker nodes with it): Ray's RayParams and Node."""
    import ray._private.node
    import ray._private.parameter

    params = inspect.signature(ray._private.parameter.RayParams).parameters
    for name in ("gcs_address", "redis_address", "node_ip_address", "min_worker_port", "max_worker_port",
                 "dashboard_agent_listen_port", "num_cpus", "num_gpus", "object_store_memory", "resources"):
        assert name in params, f"ray._private.parameter.RayParams lost {name}"
    node = inspect.signature(ray._private.node.Node).parameters
    assert {"head", "shutdown_at_exit", "spawn_reaper"} <= set(node), "ray._private.node.Node"


@pytest.mark.slow
def test_runtime_internals_on_a_local_ray(ray_local, tmp_path):
    """The GCS cluster config, the autoscaler's status key and the trial's storage check, on a real Ray."""
    assert _compat.gcs_cluster_config() is None  # callable; a local Ray has no autoscaler config
    status = _compat.autoscaler_status()  # the local Ray's own monitor publishes one too
    assert status is not None and "monitor_pid" in json.loads(status), "DEBUG_AUTOSCALING_STATUS"
    assert _compat.check_trial_storage() is None  # outside a trial: nothing to check

    def trial(config):
        from ray.train._internal.session import get_session

        storage = get_session().storage
        ray.tune.report({"has_check": hasattr(storage, "_check_validation_file"),
                         "problem": str(_compat.check_trial_storage())})

    result = ray.tune.Tuner(trial, run_config=ray.tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    assert result.metrics["has_check"], "StorageContext._check_validation_file"
    assert result.metrics["problem"] == "None"  # the trial's node sees the storage


def test_token_auth_internals(tmp_path, monkeypatch):
    """RAY_AUTH_MODE=token with Ray's config and token cache refreshed, and the token found by its path."""
    from ray._raylet import AuthenticationTokenLoader, Config

    token = tmp_path / "auth_token"
    token.write_text("a" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # restored after the test
    try:
        _compat.use_token_auth()
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert _compat.has_auth_token(), "AuthenticationTokenLoader.has_token"
        assert AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True) == "a" * 64
    finally:
        monkeypatch.undo()
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def test_bind_to_loopback_internals(monkeypatch):
    import ray._private.worker
    from ray._private import ray_constants, services

    # a Ray another test of this process left running answers with its own node's address
    monkeypatch.setattr(ray._private.worker, "_global_node", None)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "1")
    _compat.bind_to_loopback()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert services.get_node_ip_address() == "127.0.0.1", "ray_constants.ENABLE_RAY_CLUSTER"


def test_bootstrap_aws_exists():
    """What `ray up` runs on an AWS config (the moto test in tests/study/cluster/test_doctor.py runs it)."""
    from ray.autoscaler._private.aws import config

    assert list(inspect.signature(config.bootstrap_aws).parameters) == ["config"], "bootstrap_aws(config)"
