"""FSGL and MetaSAug studies on an ImageNet-LT-shaped file-list dataset (40 classes of generated JPEGs with
long-tailed train counts in a random class order, val and test lists): Ray Tune + Optuna run each end to end,
the first trial is the family's published recipe, and every trial completes."""

from __future__ import annotations

import math

import optuna
import pytest

from ltstudy.config import resolve_config
from ltstudy.methods import get_method
from ltstudy.study.run import StudyOptions, run_study
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage

from support.configs import train_backbone
from support.data import write_imagenet_lt_tree

pytestmark = pytest.mark.slow

#: small enough for a 2-core CI box: 16 px crops, ResNet-32, two epochs, no decoding workers
SMALL = {"image_size": 16, "model": "resnet32", "epochs": 2, "batch_size": 32, "eval_batch_size": 256,
         "num_workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_lt")
    images, lists, counts = write_imagenet_lt_tree(root)
    data = {"dataset": "filelist", "data_root": str(images), "train_list": str(lists["train"]),
            "val_list": str(lists["val"]), "test_list": str(lists["test"])}
    return data, counts, root


def _study(method: str, overrides: dict, tmp_path, trials: int = 2):
    return run_study(StudyOptions(
        method=method, num_trials=trials, max_concurrent=1, sampler="random", seed=0, scheduler="none",
        storage=str(tmp_path / "storage"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        study_name=f"{method}-filelist", retries=0, verbose=0, fixed=overrides))


def _first_trial(tmp_path, study: str) -> dict:
    ot = optuna.load_study(study_name=study,
                           storage=open_optuna_storage(str(tmp_path / "storage" / OPTUNA_JOURNAL)))
    return min(ot.trials, key=lambda t: t.number).params


def _check(summary, trials: int) -> None:
    assert summary.counts == {"completed": trials}, summary.counts
    for t in summary.trials:
        for split in ("val", "test"):
            assert math.isfinite(t["metrics"][f"{split}_top1"])


def test_fsgl_study_runs_on_the_file_list_tree(ray_local, tree, tmp_path):
    data, counts, _ = tree
    summary = _study("fsgl", {**data, **SMALL}, tmp_path)
    _check(summary, 2)
    recipe = get_method("fsgl").recipe("imagenet").settings
    first = _first_trial(tmp_path, "fsgl-filelist")
    for key in ("fcc", "label_weighting", "resample_weighting", "lr", "weight_decay"):
        assert first[key] == recipe[key], key
    assert (first["fcc"], first["resample_weighting"]) == (0.1, 0.2)


def test_metasaug_study_runs_on_the_file_list_tree(ray_local, tree, tmp_path):
    """The ImageNet-LT recipe: the classifier of a stage-1 network trained on the same lists, a meta set of 10
    images per class carved from the val list (12 per class: 2 remain for validation)."""
    data, counts, root = tree
    stage1 = train_backbone(str(root / "stage1"), **{**data, **SMALL, "epochs": 3})
    summary = _study("metasaug", {**data, **SMALL, "backbone": stage1, "meta_batch": 32}, tmp_path)
    _check(summary, 2)
    first = _first_trial(tmp_path, "metasaug-filelist")
    assert first["lr"] == 3e-4 and first["lam"] == 0.25
    cfg = resolve_config({**data, **SMALL, "method": "metasaug", "backbone": stage1})
    assert (cfg.params.train_scope, cfg.params.covariance, cfg.params.loss) == ("classifier", "diag", "ce")
