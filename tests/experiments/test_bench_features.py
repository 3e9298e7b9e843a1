"""``ltstudy bench features``: the read and TailCalibX benchmarks run and report what the README table shows."""

from __future__ import annotations

import pytest

from ltstudy.cli import main
from ltstudy.experiments.bench_features import bench_read, imagenet_lt_counts


def test_imagenet_lt_shaped_counts():
    counts = imagenet_lt_counts()
    assert sum(counts) == 115_846 and max(counts) == 1280 and min(counts) == 5
    many = sum(c > 100 for c in counts)
    few = sum(c < 20 for c in counts)
    assert (many, len(counts) - many - few, few) == (385, 479, 136)  # ImageNet-LT's split
    assert counts == sorted(counts, reverse=True)


def test_read_benchmark_reports_ours_beside_the_raw_read(tmp_path):
    (row,) = bench_read([(3000, 16)], storage=str(tmp_path), repeats=1)
    assert row["rows"] == 3000 and row["megabytes"] > 0.19
    for label in ("cold", "warm"):
        for what in ("raw", "first", "read"):
            assert row[f"{label}_{what}_mb_per_s"] > 0
        assert row[f"{label}_ratio"] == pytest.approx(row[f"{label}_read_mb_per_s"] / row[f"{label}_raw_mb_per_s"])


def test_cli_runs_the_read_and_tailcalibx_parts(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as code:
        main(["bench", "features", "--part", "read", "--part", "tailcalibx", "--read-shape", "2000x8",
              "--tailcalibx-shape", "600x16x10", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code.value.code == 0, out
    assert "2000 x 8" in out and "TailCalibX on random features" in out and "peak RSS MiB" in out
    with pytest.raises(SystemExit) as code:
        main(["bench", "features", "--part", "nope"])
    assert code.value.code == 2
