"""Bad input to ``ltstudy tune``: one line naming the problem, exit code 2, nothing written anywhere."""

from __future__ import annotations

import pytest

from ltstudy.cli import main
from ltstudy.testing.servers import free_port

BAD_SPACES = {
    "malformed": "method: ce\ntune: {lr: [unclosed\n",
    "undeclared": "method: ce\ntune:\n  momentum_typo: {type: float, low: 0.1, high: 0.9}\n",
    "low_gt_high": "method: ce\ntune:\n  lr: {type: float, low: 0.5, high: 0.01}\n",
    "log_nonpositive": "method: ce\ntune:\n  weight_decay: {type: float, low: 0.0, high: 0.001, log: true}\n",
}


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize("case", [*BAD_SPACES, "unknown_method", "unreachable_tracking"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    argv = ["tune", "--storage", str(tmp_path / "storage"), "--study-name", "bad"]
    if case in BAD_SPACES:
        space = tmp_path / "space.yaml"
        space.write_text(BAD_SPACES[case])
        argv += ["--method", "ce", "--space", str(space), "--tracking-uri", uri]
    elif case == "unknown_method":
        argv += ["--method", "no_such_method", "--tracking-uri", uri]
    else:
        uri = f"http://127.0.0.1:{free_port()}"
        argv += ["--method", "ce", "--tracking-uri", uri]
    code, err = _run(argv + ["dataset=synthetic"], capsys)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    expected = {"malformed": "malformed YAML", "undeclared": "momentum_typo", "low_gt_high": "low (0.5) > high",
                "log_nonpositive": "log scale needs low > 0", "unknown_method": "unknown method",
                "unreachable_tracking": "unreachable"}[case]
    assert expected in err
    assert not db.exists()
    assert not (tmp_path / "storage").exists()
    assert not (tmp_path / "mlruns").exists()


def test_unknown_override_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(["tune", "--method", "ce", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                      "not_a_key=1"], capsys)
    assert code == 2 and "not_a_key" in err and not (tmp_path / "m.db").exists()


def test_export_unknown_study(tmp_path, capsys):
    code, err = _run(["best-config", "export", "--study", "nope", "--tracking-uri",
                      f"http://127.0.0.1:{free_port()}"], capsys)
    assert code == 2 and "unreachable" in err
