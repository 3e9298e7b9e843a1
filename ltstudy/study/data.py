"""The data a study trains on, made ready once on the driver before any trial: a dataset downloaded and
validated once, a backbone's data settings carried over, its features extracted once into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from ltstudy.config import PATH_KEYS, load_data, resolve_config
from ltstudy.errors import ConfigError
from ltstudy.features.extract import load_backbone_checkpoint
from ltstudy.models import is_pretrained_name
from ltstudy.runtime import resolve_device
from ltstudy.study.search.space import SearchSpace
from ltstudy.study.tracking.records import resolve_backbone
from ltstudy.train.feature import CHECKED_KEYS, resolve_features


def stage_data(values: dict[str, Any], storage: str, remote_storage: bool) -> dict[str, Any]:
    """Fetch (``download``) once and validate the dataset on the driver; returns what the trials fix.

    With ``download`` and no ``data_root``, the data goes to ``<storage>/data`` (a folder every node sees
    when the storage is shared). Trials then run with ``download=false`` and read that folder.
    """
    fixed: dict[str, Any] = {}
    if values.get("download"):
        if not values.get("data_root"):
            if remote_storage:
                raise ConfigError("--download with an object-store --storage needs --data-root, a folder "
                                  "every node sees (e.g. on the shared file system)")
            fixed["data_root"] = str(Path(storage) / "data")
        fixed["download"] = False
    cfg = resolve_config({**values, **fixed, "download": bool(values.get("download"))})
    load_data(cfg)  # downloads when asked, then reads and splits: a DataError is one line, exit 2
    return fixed


def backbone_settings(method: str, backbone: str | None, fixed: dict[str, Any],
                      tracking_uri: str | None) -> dict[str, Any]:
    """Feature-stage studies: ``fixed`` plus the backbone checkpoint and the data split it was trained on."""
    value = backbone or fixed.get("backbone")
    if not value:
        raise ConfigError(f"method {method!r} tunes on cached backbone features: pass --backbone "
                          "CHECKPOINT (a checkpoint.pt, its folder, or the MLflow run id of a trial)")
    if is_pretrained_name(str(value)):  # timm:/open_clip: -- no checkpoint; the data is the flags' own
        return {**fixed, "backbone": str(value)}
    state = load_backbone_checkpoint(resolve_backbone(str(value), tracking_uri))
    keys = (*CHECKED_KEYS, *(k for k in PATH_KEYS if k != "backbone"))
    data = {k: state["config"][k] for k in keys if state["config"].get(k) is not None}
    return {**data, **fixed, "backbone": state["path"]}


def _feature_cache(values: dict[str, Any]) -> tuple[str, str]:
    """(storage URI, key) of the feature cache of ``values``, extracted here when missing."""
    storage, key = resolve_features(resolve_config(values), resolve_device("auto"))
    return storage.uri, key


def extract_features_once(space: SearchSpace, storage: str, on_gpu: bool = False) -> dict[str, Any]:
    """Extract the backbone's features into the study's storage once, before any trial starts: as a Ray
    task on a GPU when the cluster has (or can get) one, else in this process. Returns what the trials fix."""
    values = {**space.published_values(), "feature_storage": storage}
    if on_gpu:
        task = ray.remote(num_cpus=1, num_gpus=1, max_retries=1)(_feature_cache)
        uri, key = ray.get(task.remote(values))
    else:
        uri, key = _feature_cache(values)
    return {"feature_storage": uri, "feature_key": key}
