"""The data a study trains on, as an MLflow dataset input: name, digest of the split, class counts.

MLflow shows dataset inputs on every run and lets the runs of different studies be grouped by the data
they saw. The digest hashes the split itself (the train / val / test sample indices and labels, which
the data-defining keys fix), so two studies on the same split share a digest whatever their folder, and a
different seed or imbalance factor gives a different one. The profile carries the training class counts
that the per-class plots sort by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow.entities import Dataset, DatasetInput, InputTag

if TYPE_CHECKING:  # ltstudy.config pulls in torch and every method: the read side (report, studies) needs neither
    from ltstudy.config import TrialConfig

CONTEXT_TAG = "mlflow.data.context"


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    digest: str
    source: str
    class_counts: list[int]
    class_names: list[str]
    sizes: dict[str, int]
    many_threshold: int
    few_threshold: int

    def profile(self) -> dict[str, Any]:
        return {"num_rows": self.sizes["train"], "splits": self.sizes, "num_classes": len(self.class_counts),
                "class_counts": self.class_counts, "class_names": self.class_names,
                "many_threshold": self.many_threshold, "few_threshold": self.few_threshold}

    def to_mlflow(self):
        """An ``mlflow.entities.DatasetInput`` (context ``train``)."""
        schema = {"mlflow_colspec": [{"name": "image", "type": "tensor"}, {"name": "label", "type": "long"}]}
        ds = Dataset(self.name, self.digest, "local" if "://" not in self.source else "uri",
                     json.dumps({"uri": self.source}), json.dumps(schema), json.dumps(self.profile()))
        return DatasetInput(ds, tags=[InputTag(CONTEXT_TAG, "train")])


def data_key(cfg: TrialConfig) -> tuple:
    """What defines a trial's data; trials with equal keys share one record."""
    from ltstudy.config import DATA_KEYS

    t = cfg.train
    return tuple((k, getattr(t, k)) for k in DATA_KEYS) + (("data_root", t.data_root),)


def dataset_record(cfg: TrialConfig) -> DatasetRecord:
    """Load the trial's split (images stay on the CPU) and describe it."""
    from ltstudy.config import load_data

    t = cfg.train
    data = load_data(cfg)
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        h.update(split.indices.cpu().numpy().astype("int64").tobytes())
        h.update(split.labels.cpu().numpy().astype("int64").tobytes())
    name = f"{t.dataset}-if{t.imbalance:g}" + (f"-{t.profile}" if t.profile != "exp" else "") + f"-seed{t.seed}"
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    return DatasetRecord(name, h.hexdigest()[:12], str(t.data_root or t.dataset),
                         [int(n) for n in data.class_counts.tolist()], [str(n) for n in data.class_names],
                         sizes, t.many_threshold, t.few_threshold)


def record_from_run(run: Any) -> dict[str, Any] | None:
    """The profile (class counts, sizes, thresholds) of the dataset input logged on an MLflow run."""
    inputs = getattr(run, "inputs", None)
    for item in getattr(inputs, "dataset_inputs", None) or []:
        try:
            profile = json.loads(item.dataset.profile or "{}")
        except ValueError:
            continue
        if "class_counts" in profile:
            return {"name": item.dataset.name, "digest": item.dataset.digest, **profile}
    return None
