"""The examples run as a user runs them (a subprocess, at --small size) and leave a reportable run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgdscope.store import RunStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


SCRIPTS = ["own_cnn.py", "own_lm.py"]


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Both examples, started at once: each is one single-threaded interpreter, so on a machine of two or
    more cores they run side by side instead of one after the other."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    procs = {}
    for script in SCRIPTS:
        out = tmp_path_factory.mktemp(script.removesuffix(".py")) / "run"
        procs[script] = (subprocess.Popen([sys.executable, str(EXAMPLES / script), "--small", "--out", str(out)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), out)
    yield procs
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.slow  # a fresh interpreter each: importing torch, scikit-learn and matplotlib dominates
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_writes_a_run_with_its_measurements_and_report(started, script):
    proc, out = started[script]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert (out / "report.html").stat().st_size > 0 and list((out / "figures").glob("*.png"))
    store = RunStore(out)
    assert store.status()["state"] == "done"
    steps = store.table("train")["step"].tolist()
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 10
    eigen, interp = store.table("eigen"), store.table("interpolation")
    assert 0 in set(eigen["step"]) and eigen["value"].notna().all()
    # one interpolation curve per step of the first epoch, θ_t → θ_t+1, starting at step 0
    assert sorted(set(interp["step"]))[:3] == [0, 1, 2] and interp["loss"].notna().all()
    for table in ("direction", "alpha_step", "epoch"):
        assert len(store.table(table)), table
    store.close()
