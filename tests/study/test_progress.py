"""The study's progress lines and footer (no Ray): plain lines with the counts when stdout is not a
terminal, a live footer (counts, running trials' epochs, best, time left) when it is."""

from __future__ import annotations

import io
import time

from rich.console import Console

from ltstudy.study.progress import ProgressBoard, fmt_duration, fmt_params, fmt_value


def _board(terminal: bool) -> tuple[ProgressBoard, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80, color_system=None)
    return ProgressBoard(console, "val_top1", "max", num_trials=3, concurrency=2), out


def test_plain_output_is_one_unwrapped_line_per_event_with_the_counts():
    board, out = _board(terminal=False)
    params = {"lr": 0.123456, "weight_decay": 2e-4, "sampler": "power", "sampler_q": 0.5}
    board.start("a", "trial 0", params)
    board.start("b", "trial 1", {"lr": 0.3})
    board.result("a", 1, 3, 0.25)
    board.end("a", "trial 0", "completed", 3, 3, 0.5)
    board.end("b", "trial 1", "pruned", 1, 3, 0.2)
    board.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial 0 started: lr=0.1235 weight_decay=0.0002 sampler=power sampler_q=0.5"
    assert len(lines) == 4 and all(len(x) > 80 for x in lines[2:]), lines  # never wrapped at 80 columns
    assert lines[2].startswith("trial 0: completed after epoch 3/3, val_top1 50.00%, ")
    assert "1/3 done · 1 running · 0 pruned · 0 failed · best val_top1 50.00% (trial 0) · ~" in lines[2]
    assert "2/3 done · 0 running · 1 pruned · 0 failed · best val_top1 50.00% (trial 0)" in lines[3]


def test_terminal_gets_a_live_footer_and_short_lines():
    board, out = _board(terminal=True)
    board.start("a", "trial 0", {"lr": 0.1})
    board.start("b", "trial 1", {"lr": 0.2})
    board.running["a"].started -= 20  # 20 s in, 2 of 4 epochs: a 40 s trial
    board.result("a", 2, 4, 0.3)
    footer = "\n".join(str(r) for r in board.footer().renderables)
    assert "0/3 done · 2 running · 0 pruned · 0 failed · best: none completed yet" in footer
    assert "trial 0: epoch 2/4, val_top1 30.00%" in footer and "trial 1: epoch 0/?" in footer
    eta = board.eta()
    assert 45 < eta < 55  # (20 s left of trial 0 + 40 s of trial 1 + 40 s for trial 2) / 2 at once
    board.end("a", "trial 0", "failed", 2, 4, None, "NonFiniteLossError: loss is nan")
    board.close()
    text = out.getvalue()
    assert "trial 0: failed after epoch 2/4, val_top1 –" in text and "NonFiniteLossError" in text
    assert " | " not in text  # the counts live in the footer, not on each line


def test_formatting():
    assert fmt_value("val_loss", 0.123456) == "0.1235" and fmt_value("val_few", 0.5) == "50.00%"
    assert fmt_value("val_top1", float("nan")) == "–"
    assert fmt_params({"a": 1e-5, "b": "x"}) == "a=1e-05 b=x"
    assert [fmt_duration(s) for s in (5, 600, 7300)] == ["5 s", "10 min", "2 h 01 min"]


def test_time_left_comes_from_finished_trials():
    board, _ = _board(terminal=False)
    board.start("a", "trial 0", {})
    board.running["a"].started = time.monotonic() - 10
    board.end("a", "trial 0", "completed", 3, 3, 0.4)
    assert abs(board.eta() - 10.0) < 1.0  # two trials of ~10 s left, two at a time


def test_a_resumed_board_counts_and_ranks_the_trials_it_had():
    board = ProgressBoard(Console(file=io.StringIO()), "val_top1", "max", 5, live=False)
    board.seed([{"status": "completed", "number": 0, "trial_id": "a", "metrics": {"val_top1": 0.5}},
                {"status": "completed", "number": 2, "trial_id": "c", "metrics": {"val_top1": 0.7}},
                {"status": "budget", "number": 1, "trial_id": "b", "metrics": {"val_top1": 0.9}}])
    status = board.status()
    assert "3/5 done" in status and "1 cut by the budget" in status and "best val_top1 70.00% (trial 2)" in status


def test_a_study_with_no_completed_trial_is_a_failure():
    from ltstudy.study.results.summary import StudySummary

    def summary(*statuses):
        return StudySummary(study="s", metric="m", mode="max", best=None, tuned=[], counts={}, experiment_path="",
                            tracking_uri="", parent_run_id="", wall_s=0, trial_wall_s={},
                            trials=[{"status": s} for s in statuses])

    assert summary("completed", "budget").failure() is None
    assert summary("budget", "pruned").failure() == "no trial completed (1 budget, 1 pruned)"
    assert summary().failure() == "no trial ran"
    assert summary("failed").failure().startswith("all 1 trials failed")
