"""scripts/quality_report.py: how the quality table counts each model's training GPU time."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "quality_report.py"


@pytest.fixture
def report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RES", tmp_path)
    (tmp_path / "logs").mkdir()
    return mod


SIDE_BY_SIDE = (
    "calibration it/s alone: mar-l 9.50 mar-x 7.89 casmar 5.69 -> MAR size x (...), 1060 steps each "
    "(batch 1024); GPU-minutes alone MAR / CASMAR 2.24 / 3.11\n"
)


def test_side_by_side_runs_count_steps_over_alone_speed(report, tmp_path):
    (tmp_path / "logs" / "mar_casmar_budget.txt").write_text(SIDE_BY_SIDE)
    gpu, how = report.gpu_seconds("mar", [1060], wall=236.0)
    assert how == "steps / alone speed" and gpu == pytest.approx(1060 / 7.89)
    gpu, _ = report.gpu_seconds("casmar", [1060], wall=247.0)
    assert gpu == pytest.approx(1060 / 5.69)


def test_a_recalibration_takes_precedence(report, tmp_path):
    (tmp_path / "logs" / "mar_casmar_budget.txt").write_text(SIDE_BY_SIDE)
    (tmp_path / "recalibration").mkdir()
    (tmp_path / "recalibration" / "budget.txt").write_text(
        "calibration it/s alone: mar-x 8.94 mar-y 7.40 casmar 7.29 -> MAR size x (...)\n"
    )
    speeds, src = report.alone_speeds()
    assert speeds == {"mar-x": 8.94, "mar-y": 7.40, "casmar": 7.29} and src.parent.name == "recalibration"
    # the trained size is call 2's (x), at the recalibrated speed
    assert report.gpu_seconds("mar", [1060], wall=236.0)[0] == pytest.approx(1060 / 8.94)


def test_runs_alone_count_their_wall_time(report, tmp_path):
    (tmp_path / "logs" / "mar_casmar_budget.txt").write_text(
        "calibration it/s alone: mar-y 7.40 casmar 7.29 -> MAR size y (...), 1290 steps each "
        "(batch 1024), trained one after the other, each alone; GPU-minutes alone MAR / CASMAR 2.9 / 2.9\n"
    )
    assert report.gpu_seconds("casmar", [1290], wall=190.0) == (190.0, "wall, alone")
    # VAR / HMAR train side by side with no alone timing: their wall time, labelled as such
    assert report.gpu_seconds("var", [2110], wall=215.0) == (215.0, "wall, side by side")


def test_budget_cell_names_what_was_measured(report):
    s = {"steps": [1060], "batch": 1024, "gpu_s": 118.6, "gpu_how": "steps / alone speed", "wall_s": 236.0}
    assert report.fmt_budget(s) == "1060 steps × 1024, 1.98 GPU-min alone (3.93 min wall side by side)"
    s.update(gpu_s=215.4, gpu_how="wall, side by side")
    assert report.fmt_budget(s) == "1060 steps × 1024, 3.59 min wall side by side"
    s.update(steps=[810], gpu_s=131.7, gpu_how="wall, alone")
    assert report.fmt_budget(s) == "810 steps × 1024, 2.19 GPU-min alone"


def test_the_tried_table_ends_with_the_tables_run(report, tmp_path):
    (tmp_path / "logs" / "mar_casmar_budget.txt").write_text(
        "calibration it/s alone: mar-y 7.49 casmar 5.71 -> MAR size y (...), 810 steps each (batch 1024), "
        "trained one after the other, each alone; GPU-minutes alone MAR / CASMAR 1.80 / 2.36\n"
    )
    assert "one after the other, each alone" in report.how_trained()
    summary = {"fid": [86.0, 85.6], "fd": [119.5], "steps": [810], "gpu_s": 125.4}
    sums = {"mar": summary, "casmar": dict(summary, fid=[81.3], fd=[96.5], gpu_s=131.7)}
    last = [line for line in report.tried(sums) if line.startswith("| **table**")]
    row = "| **table** | 10 + 10 × 256 | 810 | 2.09 / 2.19 | 85.80 / 81.30 | 119.50 / 96.50 | tuned |"
    assert last == [row]
    # without the table's FID or GPU time there is no row to compare
    assert report.tried(dict(sums, mar=dict(summary, fid=[]))) == []


def test_var_and_hmar_use_their_alone_timing_where_measured(report, tmp_path):
    assert report.gpu_seconds("hmar", [1400, 710], wall=226.0) == (226.0, "wall, side by side")
    (tmp_path / "logs" / "var_hmar_alone.txt").write_text(
        "var-hmar it/s alone: var 12.5 hmar1 13.0 hmar2 11.0 (120 steps each, the last 60 timed)\n"
    )
    gpu, how = report.gpu_seconds("hmar", [1400, 710], wall=226.0)
    assert how == "steps / alone speed" and gpu == pytest.approx(1400 / 13.0 + 710 / 11.0)
    assert report.gpu_seconds("var", [2110], wall=215.0)[0] == pytest.approx(2110 / 12.5)


def test_equal_time_point_picks_the_costlier_models_nearest_checkpoint(report):
    def summary(steps, gpu_s):
        return {"steps": [steps], "gpu_s": gpu_s, "gpu_how": "steps / alone speed"}

    def curve(m, fds):
        return [{"model": m, "row": "train_curve", "label": str(n), "n": 500, "metrics": {"FD_clf": fd}}
                for n, fd in fds.items()]  # fmt: skip

    sums = {"mar": summary(1000, 100.0), "casmar": summary(1000, 125.0)}  # CASMAR 8 it/s alone
    st = {"rows": curve("mar", {500: 200.0, 1000: 150.0}) + curve("casmar", {600: 120.0, 800: 110.0})}
    (line,) = report.equal_time_checkpoints(sums, st)
    # 800 steps at 8 it/s = 100 s: MAR's whole run
    assert "CASMAR's checkpoint at step 800" in line and "CASMAR FD_clf 110.0" in line
    assert "MAR FD_clf 150.0" in line
    sums["casmar"]["gpu_s"] = 105.0  # within 10%: nothing to add
    assert report.equal_time_checkpoints(sums, st) == []
