"""The study run: one MLflow experiment per study and its parent run, opened only after all input is valid."""

from __future__ import annotations

from typing import Any

from ltstudy.study.tracking.store import (
    EXPERIMENT_KIND,
    PARENT_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TrackingError,
    artifact_location,
    client,
    log_batch,
)


class StudyTracker:
    """The experiment (one per study) and its parent run; created only after all input is valid."""

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        self.mlc = client(uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def open(self, tags: dict[str, Any], resume: bool) -> str:
        """Get or create the experiment and the study run; on resume reuse both.

        A fresh start finds no study run unless an earlier start failed before its first trial (Ray never
        started, e.g. a cluster that went away): that run is deleted and the study starts again.
        """
        exp = self.mlc.get_experiment_by_name(self.study)
        if exp is None:
            self.experiment_id = self.mlc.create_experiment(
                self.study, artifact_location=artifact_location(self.uri, self.study),
                tags={STUDY_TAG: self.study, **EXPERIMENT_KIND})
        elif exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {self.study!r} is deleted in {self.uri}; restore it or pick "
                                "another --study-name")
        else:
            self.experiment_id = exp.experiment_id
        parent = self._find_parent()
        if parent is not None and not resume:
            if self.mlc.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=1):
                raise TrackingError(f"study {self.study!r} already has trial runs in {self.uri}; pass --resume "
                                    "or pick another --study-name")
            self.mlc.delete_run(parent)  # a start that failed before any trial: start again
            parent = None
        if parent is None:
            run = self.mlc.create_run(self.experiment_id, run_name=self.study,
                                      tags={ROLE_TAG: "study", STUDY_TAG: self.study})
            self.parent_run_id = run.info.run_id
            log_batch(self.mlc, self.parent_run_id, tags=tags)
        else:
            self.parent_run_id = parent
            self.mlc.update_run(parent, status="RUNNING")
            log_batch(self.mlc, parent, tags={"ltstudy.interrupted": "false"})
        return self.parent_run_id

    def _find_parent(self) -> str | None:
        runs = self.mlc.search_runs([self.experiment_id], f"tags.`{ROLE_TAG}` = 'study'",
                                    max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def interrupted(self, how: str) -> int:
        """Mark the study run and every trial run still RUNNING as KILLED (tagged interrupted)."""
        killed = 0
        for run in self.mlc.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                        max_results=5000):
            if run.info.status == "RUNNING":
                log_batch(self.mlc, run.info.run_id, tags={STATUS_TAG: "interrupted"})
                self.mlc.set_terminated(run.info.run_id, "KILLED")
                killed += 1
        log_batch(self.mlc, self.parent_run_id, tags={"ltstudy.interrupted": how})
        self.mlc.set_terminated(self.parent_run_id, "KILLED")
        return killed
