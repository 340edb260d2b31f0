"""report.html (checked in headless Chromium) and the TensorBoard mirror, on synthetic stores."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sgdscope.report import write_report
from sgdscope.store import RunStore

from stores import BARRIER_STEPS, synthetic_run, synthetic_sweep  # noqa: E402

from browser import check_in_browser, needs_chromium  # noqa: E402


def assert_self_contained(page: str) -> None:
    assert "<script" not in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert not [r for r in refs if re.match(r"[a-z]+://", r)], "the report must not load anything from outside"
    assert all(r.startswith(("data:", "#")) or not r.startswith("/") for r in refs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 2-run sweep, one run failed, with its reports written."""
    path = synthetic_sweep(tmp_path_factory.mktemp("report") / "sweep", {"optimizer.lr": [0.05, 0.2]})
    RunStore(path / "runs" / "lr=0.2").set_status("failed", error="DivergenceError: loss became nan at step 7")
    assert write_report(path) == path / "report.html"
    return path


def test_run_report_contents(tmp_path):
    store = synthetic_run(tmp_path / "run")
    page = write_report(store.path).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "<code>train-restore</code>: batch statistics" in page
    assert "<b>160</b> training examples (50% of 320)" in page
    assert page.count("data:image/png;base64,") == 15  # 13 run figures, walk and bowl twice
    for quantity in ("peak λ₁ (5-point smoothed)", "k_min along e1, 1% rise", "α = 4 along e1: loss change",
                     "barriers crossed", "σᵢ²/λᵢ spread (max/min over i, median)",
                     "batch sharpness / SGD threshold (late mean)", "λ_max(P⁻¹H) / threshold (late mean)",
                     "share of steps that cross the floor", "median largest angle θ3 to the previous measurement (°)"):
        assert quantity in page
    assert f"barriers {len(BARRIER_STEPS)}/10" in page
    assert "optimizer:\n  name: sgd" in page  # the config, as YAML


def test_report_of_a_run_without_measurements(tmp_path):
    store = synthetic_run(tmp_path / "run", full=False)
    store.set_status("failed", error="DataError: bad file")
    page = write_report(store.path).read_text(encoding="utf-8")
    assert "This run failed:</b> DataError: bad file" in page
    assert page.count("data:image/png;base64,") == 1  # learning curves only


def test_sweep_report_links_and_tables(sweep):
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    links = re.findall(r'href="(runs/[^"]+/report.html)"', page)
    assert len(links) == 2 and all((sweep / link).is_file() for link in links)
    run_page = (sweep / links[0]).read_text(encoding="utf-8")
    assert 'href="../../report.html"' in run_page
    assert "Jastrzebski et al., Table 1" in page and "Xing et al., Table 1" in page
    assert (sweep / "tables" / "xing_table1_barriers.csv").read_text().splitlines()[1].endswith(f",0,{len(BARRIER_STEPS)}")
    assert '<span class="badge failed">failed</span> 1' in page


@needs_chromium
def test_reports_render_in_headless_chromium(sweep, tmp_path):
    check_in_browser(sweep / "report.html", tmp_path)
    check_in_browser(sweep / "runs" / "lr=0.05" / "report.html", tmp_path)


def test_cli_report(tmp_path):
    run = synthetic_run(tmp_path / "run", full=False).path
    res = subprocess.run([sys.executable, "-m", "sgdscope.cli", "report", str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(run / "report.html")


# ------------------------------------------------------------------------------------------ TensorBoard


def _scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirror_is_incremental(tmp_path):
    pytest.importorskip("tensorboard")
    from sgdscope.tb import mirror_to_tensorboard

    store = synthetic_run(tmp_path / "run", full=False)
    tb = mirror_to_tensorboard(store.path)
    first = _scalars(tb)
    assert len(first["train/batch_loss"]) == 60 and first["epoch/val_acc"][0][0] == 10
    assert mirror_to_tensorboard(store.path) == tb and _scalars(tb) == first  # nothing new: nothing written
    store.append("eigen", [{"step": 60, "epoch": 6, "index": i, "value": 1.0 / i, "logged_at": 60} for i in (1, 2)])
    mirror_to_tensorboard(store.path)
    after = _scalars(tb)
    assert after["eigen/value/index=2"] == [(60, 0.5)] and len(after["train/batch_loss"]) == 60
    # a resume drops the rows after its checkpoint: the mirror is rebuilt, not left with stale rows
    store.truncate_after(30)
    mirror_to_tensorboard(store.path)
    rebuilt = _scalars(tb)
    assert len(rebuilt["train/batch_loss"]) == 30 and "eigen/value/index=1" not in rebuilt
