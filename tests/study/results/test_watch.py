"""A study you can watch and read: the README's first command through the CLI (quiet, plain progress),
its MLflow records read back, ``studies show / list / delete``, ``report`` and optuna-dashboard.

Two small studies share one storage and one tracking store (the README defaults, in a temporary folder):
the README's command on synthetic data (ASHA, the ce space with its conditional ``sampler_q``) and a
``val_loss`` study without early stopping, so that importances exist and the two objectives differ.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ltstudy.cli import main
from ltstudy.study.results.catalog import study_info, trials_frame
from ltstudy.study.results.plots import OPTUNA_PLOTS
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.search.space import active_values, load_space
from ltstudy.study.tracking.links import RUN_ID_ATTR
from ltstudy.study.tracking.records import find_study
from ltstudy.study.tracking.store import EPOCHS_TAG, NUMBER_TAG, TUNED_PREFIX

from support.configs import TINY
from support.servers import REPO

pytestmark = pytest.mark.slow

SECOND = """\
method: ce
metric: val_loss
mode: min
fixed: {epochs: 1}
tune:
  lr: {type: float, low: 0.01, high: 0.5, log: true}
  weight_decay: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""
TINY_DATA = {k: v for k, v in TINY.items() if k not in ("dataset", "imbalance")}


def readme_argv() -> list[str]:
    """The README's first command with the dataset swapped for synthetic data (everything else as is)."""
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "pip install -e . &&" in x)
    argv = line.split("ltstudy ", 1)[1].split()
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--data-root":
            skip = True
            continue
        out.append(arg)
        if arg == "--dataset":
            argv[i + 1] = "synthetic"
        elif arg == "--imbalance":
            argv[i + 1] = str(TINY["imbalance"])
    extra = [f"{k}={v}" for k, v in TINY_DATA.items() if not any(a.startswith(f"{k}=") for a in out)]
    return out + extra


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def two_studies(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    (root / "second.yaml").write_text(SECOND)
    here = os.getcwd()
    os.chdir(root)  # the README command writes ./mlflow.db and ./ltstudy_results
    try:
        readme = cli(*readme_argv())
        second = cli("tune", "--method", "ce", "--space", "second.yaml", "--num-trials", "4", "--scheduler",
                     "none", "--sampler", "random", "--study-name", "second", "--dataset", "synthetic",
                     "--imbalance", "20", *[f"{k}={v}" for k, v in TINY_DATA.items()])
    finally:
        os.chdir(here)
    assert readme[0] == 0, readme[1][-3000:] + readme[2][-3000:]
    assert second[0] == 0, second[1][-3000:] + second[2][-3000:]
    name = re.match(r"study (\S+): ", readme[1]).group(1)
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "readme": name, "output": readme[1],
            "stderr": readme[2], "journal": str(root / "ltstudy_results" / OPTUNA_JOURNAL)}


def _summary_start(lines: list[str], name: str) -> int:
    return next(i for i, line in enumerate(lines) if re.search(rf"study {name}: (max|min) ", line))


def test_readme_command_prints_a_few_plain_lines(two_studies):
    lines = two_studies["output"].splitlines()
    start = _summary_start(lines, two_studies["readme"])
    before = lines[:start] + two_studies["stderr"].splitlines()
    assert len(before) <= 3 + 2 * 4, "\n".join(before)  # the sampler's note comes with the summary
    assert lines[1].startswith("MLflow: http") and "optuna-dashboard" in lines[2]
    text = "\n".join(before)
    for ray_output in ("Trial status", "╭", "│", "Configuration for experiment", "TensorBoard",
                       "Logical resource"):
        assert ray_output not in text, text
    assert len([x for x in lines[:start] if re.match(r"trial \d+ started: ", x)]) == 4, text
    ends = [x for x in lines[:start] if re.match(r"trial \d+: (completed|pruned|failed) after epoch", x)]
    assert len(ends) == 4 and all(" done · " in x and "running" in x for x in ends), text
    assert "4/4 done" in ends[-1]
    assert any(x.startswith("note: 4 trials: tpe models the space") for x in lines[start:]), text


def test_summary_lists_only_the_best_trials_active_parameters(two_studies):
    mlc, exp, parent = find_study(two_studies["uri"], two_studies["readme"])
    best = mlc.get_run(parent.data.tags["ltstudy.best_run_id"])
    space = load_space(REPO / "search_spaces" / "ce.yaml", "ce")
    params = {k: float(v) if k != "sampler" else v for k, v in best.data.params.items()
              if k in space.tuned_names}
    active = active_values(space.params, params)
    lines = two_studies["output"].splitlines()
    summary = lines[_summary_start(lines, two_studies["readme"]):]
    listed = [m.group(1) for x in summary if (m := re.match(r"│   (\w+) +│", x))]
    assert listed == list(active), (listed, active)
    assert ("sampler_q" in listed) == (params["sampler"] == "power")


def test_mlflow_records_read_back(two_studies):
    uri = two_studies["uri"]
    storage = open_optuna_storage(two_studies["journal"])
    for name, metric in ((two_studies["readme"], "val_top1"), ("second", "val_loss")):
        mlc, exp, parent = find_study(uri, name)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        ot = optuna.load_study(study_name=name, storage=storage)
        by_number = {t.number: t for t in ot.trials}
        info = study_info(uri, name)
        assert len(info.trials) == 4
        for t in info.trials:
            run = mlc.get_run(t["run_id"])
            ot_trial = by_number[int(run.data.tags[NUMBER_TAG])]
            assert ot_trial.user_attrs[RUN_ID_ATTR] == t["run_id"]
            tuned = {k[len(TUNED_PREFIX):]: v for k, v in run.data.tags.items() if k.startswith(TUNED_PREFIX)}
            assert tuned == {k: str(v) for k, v in ot_trial.params.items()}
            assert int(run.data.tags[EPOCHS_TAG]) >= 1
            [data] = run.inputs.dataset_inputs
            profile = json.loads(data.dataset.profile)
            assert data.dataset.name.startswith("synthetic-if20") and len(profile["class_counts"]) == 4
            assert profile["class_counts"] == sorted(profile["class_counts"], reverse=True)
            artifacts = {a.path for a in mlc.list_artifacts(t["run_id"])}
            if t["status"] != "failed":
                assert "per_class_accuracy.json" in artifacts
        [study_data] = mlc.get_run(parent.info.run_id).inputs.dataset_inputs
        assert study_data.dataset.digest == data.dataset.digest
        assert ot.metric_names == [metric] and ot.user_attrs["mlflow_study_run_id"] == parent.info.run_id


def test_studies_show_in_every_format(two_studies, tmp_path):
    uri = two_studies["uri"]
    info = study_info(uri, "second")
    frame = trials_frame(info.trials, info.metric)
    assert list(frame.columns[:7]) == ["number", "trial_id", "status", "objective", "epochs", "lr",
                                       "weight_decay"]
    assert frame["number"].tolist() == [0, 1, 2, 3] and (frame["status"] == "completed").all()
    for fmt in ("csv", "parquet", "json"):
        path = tmp_path / f"second.{fmt}"
        code, out, err = cli("studies", "show", "second", "--format", fmt, "-o", str(path), "--tracking-uri", uri)
        assert code == 0, err
        if fmt == "csv":
            back = pd.read_csv(path, dtype={"node": str, "trial_id": str})
        elif fmt == "parquet":
            back = pd.read_parquet(path)
        else:
            data = json.loads(path.read_text())
            assert data["study"]["counts"] == {"completed": 4} and data["study"]["objective"] == "min val_loss"
            assert data["study"]["resumable"] is False and data["study"]["dataset"].startswith("synthetic-if20")
            back = pd.DataFrame(data["trials"])
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    code, out, _ = cli("studies", "show", "second", "--tracking-uri", uri)
    assert code == 0 and all(r in out for r in frame["run_id"]) and "sampler random" in out
    code, _, err = cli("studies", "show", "second", "--format", "parquet", "--tracking-uri", uri)
    assert code == 2 and "-o" in err


def test_studies_list_has_the_new_columns(two_studies):
    code, out, _ = cli("studies", "list", "--tracking-uri", two_studies["uri"])
    assert code == 0
    for text in (two_studies["readme"], "second", "random + none", "tpe + asha", "4 completed / 4",
                 "resumable", "synthetic-if20"):
        assert text in out, text


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, bytes] = {}
        self.headings: list[str] = []
        self._figure: str | None = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs["id"].removeprefix("plot-")
        elif tag == "img" and self._figure:
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.figures[self._figure] = base64.b64decode(attrs["src"][len(prefix):])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_report_is_one_html_file_with_every_plot(two_studies, tmp_path):
    uri, name = two_studies["uri"], two_studies["readme"]
    out = tmp_path / "report.html"
    code, text, err = cli("report", name, "-o", str(out), "--tracking-uri", uri)
    assert code == 0, err
    parser = _Images()
    parser.feed(out.read_text())
    assert set(parser.figures) == {*OPTUNA_PLOTS, "per_class_best_vs_published", "reliability_best_vs_published"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in parser.figures.values())
    assert parser.headings == ["Summary", "Best vs published", "Calibration", "Accuracy per class, head to tail",
                               "Optuna", "Trials", "Best configuration"]
    assert "method: ce" in out.read_text()
    mlc, _, parent = find_study(uri, name)
    assert "report.html" in {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    # the report draws the figures once and leaves them, and the importances, on the study run
    plots = {Path(a.path).name for a in mlc.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"{n}.png" for n in parser.figures}
    code, _, err = cli("report", "second", "-o", str(tmp_path / "second.html"), "--tracking-uri", uri)
    assert code == 0, err
    second = find_study(uri, "second")[2]
    importances = {k for k in second.data.metrics if k.startswith("importance.")}
    assert importances == {"importance.lr", "importance.weight_decay"}


def test_optuna_dashboard_lists_both_studies_with_metric_names(two_studies):
    """optuna-dashboard's own loader and app on the one journal file the README points it at."""
    from optuna_dashboard import _app
    from optuna_dashboard._storage_url import get_storage

    app = _app.create_app(get_storage(two_studies["journal"]))

    def get(path: str) -> dict:
        status, environ = {}, {"PATH_INFO": path, "wsgi.errors": io.StringIO()}
        setup_testing_defaults(environ)
        body = b"".join(app(environ, lambda s, h, exc=None: status.setdefault("s", s)))
        assert status["s"].startswith("200"), (path, status, body[:300])
        return json.loads(body)

    studies = {s["study_name"]: s["study_id"] for s in get("/api/studies")["study_summaries"]}
    assert {two_studies["readme"], "second"} <= set(studies)
    assert get(f"/api/studies/{studies['second']}")["objective_names"] == ["val_loss"]
    detail = get(f"/api/studies/{studies[two_studies['readme']]}")
    assert detail["objective_names"] == ["val_top1"]
    attrs = {a["key"] for t in detail["trials"] for a in t["user_attrs"]}
    assert {"mlflow_run_id", "mlflow_run", "tune_trial_id"} <= attrs


def test_studies_delete_asks_then_removes_everything(two_studies, monkeypatch):
    uri, root = two_studies["uri"], two_studies["root"]
    here = os.getcwd()
    os.chdir(root)
    try:
        code, out, err = cli("tune", "--method", "ce", "--space", "second.yaml", "--num-trials", "1",
                             "--scheduler", "none", "--study-name", "doomed", "--dataset", "synthetic",
                             "--imbalance", "20", *[f"{k}={v}" for k, v in TINY_DATA.items()])
    finally:
        os.chdir(here)
    assert code == 0, out[-2000:] + err[-2000:]
    folder = root / "ltstudy_results" / "doomed"
    assert folder.is_dir()
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, out, _ = cli("studies", "delete", "doomed", "--tracking-uri", uri)
    assert code == 1 and "nothing deleted" in out and str(folder) in out and folder.is_dir()
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out, err = cli("studies", "delete", "doomed", "--tracking-uri", uri)
    assert code == 0, err
    assert not folder.exists()
    assert MlflowClient(uri).get_experiment_by_name("doomed") is None
    with pytest.raises(KeyError):
        optuna.load_study(study_name="doomed", storage=open_optuna_storage(two_studies["journal"]))
    code, _, err = cli("studies", "show", "doomed", "--tracking-uri", uri)
    assert code == 2 and "no ltstudy study named 'doomed'" in err
    names = {s.study_name for s in optuna.get_all_study_summaries(open_optuna_storage(two_studies["journal"]))}
    assert {"second", two_studies["readme"]} <= names
