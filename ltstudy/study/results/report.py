"""``ltstudy report STUDY``: one self-contained HTML file about a study, for a lab meeting.

Everything is read back from the study's records (MLflow runs, the Optuna study) and redrawn, so the
report also works for a study that was interrupted before its summary. Figures are PNGs embedded as
``data:`` URIs and the styles are inline: the file opens anywhere, offline, and can be mailed.

Sections: the summary (method, data, objective, search, trials by status, dates, resumability,
addresses), best vs published trial (metrics per bucket and the tuned values), their calibration (ECE
overall and per bucket, NLL, reliability diagrams), accuracy per class head to tail, the Optuna plots with
the importances, every trial, and the best configuration as YAML.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow.entities import Metric

from ltstudy.study.results.catalog import StudyInfo, study_info, trials_frame
from ltstudy.study.results.export import export_best
from ltstudy.study.results.plots import OPTUNA_PLOTS, log_pngs, study_pngs
from ltstudy.study.results.selection import published_trial
from ltstudy.study.search.optuna_storage import open_optuna_storage
from ltstudy.study.tracking.figures import reliability_png
from ltstudy.study.tracking.records import reliability_of_run
from ltstudy.study.tracking.store import client, log_batch, run_url

REPORT_ARTIFACT = "report.html"
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left}th{background:#f5f5f5}img{max-width:100%;border:1px solid #eee;margin:.3rem 0}
figure{margin:1rem 0}figcaption{color:#555;font-size:.85rem}pre{background:#f7f7f7;padding:.8rem;overflow:auto}
.muted{color:#666;font-size:.9rem}code{background:#f3f3f3;padding:0 .2rem}
"""
_BUCKETS = ("top1", "many", "medium", "few")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.2f}"


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="plot-{_e(name)}"><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _summary(info: StudyInfo, uri: str) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(info.counts.items())) or "none"
    dashboard = f"<code>optuna-dashboard {_e(info.optuna_storage)}</code>" if info.optuna_storage else "–"
    mlflow = run_url(uri, info.experiment_id, info.parent_run_id)
    return "<h2>Summary</h2>" + _table([
        ("method", _e(info.method)), ("data", _e(info.dataset)),
        ("objective", f"{_e(info.mode)} <code>{_e(info.metric)}</code> (validation; test is reported only)"),
        ("search", f"sampler {_e(info.sampler)}, scheduler {_e(info.scheduler)}"),
        ("trials", f"{_e(counts)} of {info.num_trials} planned"),
        ("started", _e(info.start)), ("duration", f"{info.duration_s:.0f} s ({_e(info.status)})"),
        ("resumable", f"{'yes' if info.resumable else 'no'}: {_e(info.resume_note)}"),
        ("MLflow", f'<a href="{_e(mlflow)}">{_e(mlflow)}</a> (tracking {_e(uri)})'),
        ("Optuna", dashboard), ("storage", _e(info.storage)),
    ])


def _best_vs_published(info: StudyInfo) -> str:
    rows = [("best", info.best), ("published (trial 0)", published_trial(info.trials))]
    rows = [(label, t) for label, t in rows if t is not None]
    if not rows:
        return "<h2>Best vs published</h2><p>No trial finished.</p>"
    tuned = sorted({k for _, t in rows for k in t["tuned"]})
    head = ("<tr><th>trial</th><th>status</th>" + "".join(
        f"<th>{split} {b} (%)</th>" for split in ("val", "test") for b in _BUCKETS)
        + "".join(f"<th>{_e(k)}</th>" for k in tuned) + "</tr>")
    body = ""
    for label, t in rows:
        m = t["metrics"]
        body += (f"<tr><td>{_e(label)}: trial {_e(t['number'])}</td><td>{_e(t['status'])}</td>"
                 + "".join(f"<td>{_pct(m.get(f'{s}_{b}'))}</td>" for s in ("val", "test") for b in _BUCKETS)
                 + "".join(f"<td>{_e(t['tuned'].get(k, '–'))}</td>" for k in tuned) + "</tr>")
    return f"<h2>Best vs published</h2><table>{head}{body}</table>"


_CALIBRATION = ("ece", "ece_many", "ece_medium", "ece_few", "nll")


def _calibration(mlc: Any, info: StudyInfo) -> str:
    """ECE overall and per bucket and NLL of the best and the published trial, and their test reliability."""
    rows = [("best", info.best), ("published (trial 0)", published_trial(info.trials))]
    rows = [(label, t) for label, t in rows if t is not None]
    if not rows:
        return ""
    head = "<tr><th>trial</th>" + "".join(f"<th>{split} {m.replace('_', ' ')}{'' if m == 'nll' else ' (%)'}</th>"
                                          for split in ("val", "test") for m in _CALIBRATION) + "</tr>"
    body, series = "", {}
    for label, t in rows:
        m = t["metrics"]
        cells = "".join(f"<td>{_pct(m.get(f'{s}_{k}')) if k != 'nll' else _num(m.get(f'{s}_{k}'))}</td>"
                        for s in ("val", "test") for k in _CALIBRATION)
        body += f"<tr><td>{_e(label)}: trial {_e(t['number'])}</td>{cells}</tr>"
        bins = reliability_of_run(mlc, t["run_id"])
        if bins:
            split = "test" if "test" in bins else "val"
            series[f"{label}, {split}"] = bins[split]
    out = ("<h2>Calibration</h2><p class='muted'>ECE over 15 equal-width confidence bins; a bucket's ECE counts "
           f"the samples of its classes; NLL of the true class.</p><table>{head}{body}</table>")
    if series:
        out += _figure("reliability_best_vs_published", reliability_png(series, "reliability, best vs published"),
                       "accuracy against confidence per bin (bars; the dashed line is perfect calibration), "
                       "the share of samples per bin below")
    return out


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.4f}"


def _optuna(pngs: dict[str, bytes], imp: dict[str, float]) -> str:
    out = "<h2>Optuna</h2>"
    if imp:
        out += "<p>Parameter importances (Optuna's default evaluator):</p>" + _table(
            [(k, f"{v:.3f}") for k, v in imp.items()])
    for name in OPTUNA_PLOTS:
        out += f"<h3>{_e(name.replace('_', ' '))}</h3>" + _figure(name, pngs[name], name.replace("_", " "))
    return out


def build_report(uri: str, study: str) -> tuple[str, StudyInfo, dict[str, bytes], dict[str, float]]:
    """The report's HTML, the study it describes, its figures (PNG bytes by name) and Optuna's importances."""
    info = study_info(uri, study)
    mlc = client(uri)
    parent = mlc.get_run(info.parent_run_id)
    ot_study = None
    if info.optuna_storage:
        try:
            ot_study = optuna.load_study(study_name=study, storage=open_optuna_storage(info.optuna_storage))
        except (KeyError, OSError, ValueError):
            ot_study = None
    pngs, imp = study_pngs(mlc, parent, info.trials, info.metric, ot_study, info.best)
    frame = trials_frame(info.trials, info.metric)
    try:
        best_config = yaml.safe_dump(export_best(uri, study, trials=info.trials), sort_keys=False)
    except Exception as exc:  # noqa: BLE001 - a study without a finished trial still gets its report
        best_config = f"# no best configuration: {exc}"
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ltstudy report: {_e(study)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Study {_e(study)}</h1><p class='muted'>ltstudy report, generated {datetime.now():%Y-%m-%d %H:%M}."
        "</p>",
        _summary(info, uri),
        _best_vs_published(info),
        _calibration(mlc, info),
        "<h2>Accuracy per class, head to tail</h2>",
        _figure("per_class_best_vs_published", pngs["per_class_best_vs_published"],
                "accuracy per class (left axis) with the class's training images (bars, log scale, right "
                "axis); classes sorted head to tail; shaded: many / medium / few-shot"),
        _optuna(pngs, imp),
        "<h2>Trials</h2>",
        frame.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0),
        "<h2>Best configuration</h2>",
        f"<p>For <code>ltstudy train --config best.yaml</code> (also: <code>ltstudy best-config export --study "
        f"{_e(study)} -o best.yaml</code>):</p><pre>{_e(best_config)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts), info, pngs, imp


def write_report(uri: str, study: str, output: str, log: bool = True) -> StudyInfo:
    """Write the report to ``output`` and (``log``) put it on the study run: ``report.html``, its figures
    under ``plots/`` and the importances as ``importance.<param>`` metrics. The study itself draws no figure
    at its end (they were a fifth of a small study's fixed cost); they are made here, once."""
    text, info, pngs, imp = build_report(uri, study)
    Path(output).write_text(text, encoding="utf-8")
    if log:
        mlc = client(uri)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / REPORT_ARTIFACT
            path.write_text(text, encoding="utf-8")
            mlc.log_artifact(info.parent_run_id, str(path))
        log_pngs(mlc, info.parent_run_id, pngs)
        now = int(time.time() * 1000)
        log_batch(mlc, info.parent_run_id, metrics=[Metric(f"importance.{k}", float(v), now, 0) for k, v in imp.items()])
    return info
