"""`bench devices`: the grid's points, their resume, the summary and plot, and bad grids refused."""

import json

import pytest

from stablesynth.bench.devices import run_devices_bench
from stablesynth.cli import main
from stablesynth.experiment.demo import load_run_config

METHODS = ("fine_tune", "stablesynth", "em_prior", "t3a")


def test_points_summary_plot_and_resume(tmp_path):
    cfg = load_run_config("quick")
    kw = dict(counts=(2, 3), seeds=1, total_history=36, n_unseen=2, realtime_per_device=8, methods=METHODS,
              log=lambda _: None)
    summary = run_devices_bench(cfg, tmp_path, **kw)
    assert (tmp_path / "devices.png").stat().st_size > 0
    saved = json.loads((tmp_path / "devices.json").read_text())
    assert saved["counts"] == [2, 3] and saved["rows"]["3"]["history_per_device"] == 12
    for n in ("2", "3"):
        row = summary["rows"][n]
        assert set(METHODS) | {"best_on_device"} <= set(row)
        # The global head minus itself is exactly zero; every accuracy is a fraction.
        assert row["fine_tune"]["minus_global"]["mean"] == 0.0
        assert all(0.0 <= row[m]["mean"] <= 1.0 for m in METHODS)
        assert row["best_on_device"]["chosen"][0] in ("em_prior", "t3a")
    point = json.loads((tmp_path / "points" / "n2-s0.json").read_text())
    assert point["count"] == 2 and point["history_per_device"] == 18
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    # A second run reads the finished points instead of training them again.
    logs: list[str] = []
    again = run_devices_bench(cfg, tmp_path, **{**kw, "log": logs.append})
    assert not logs and again["rows"] == summary["rows"]


@pytest.mark.parametrize("argv, named", [
    (["--counts", "1000"], "--counts 1000"),
    (["--counts", "8", "8"], "twice"),
    (["--methods", "nope"], "nope"),
    (["--methods", "f_hyper"], "fine_tune"),
    (["--total-history", "99999999"], "--total-history"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_grids_are_refused_before_anything_is_written(tmp_path, capsys, argv, named):
    out = tmp_path / "bench"
    try:
        code = main(["bench", "devices", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()
