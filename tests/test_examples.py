"""The examples run as a user runs them (a subprocess, at --small size) and leave a reportable run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgdscope.store import RunStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # a fresh interpreter each: importing torch, scikit-learn and matplotlib dominates
@pytest.mark.parametrize("script", ["own_cnn.py", "own_lm.py"])
def test_example_writes_a_run_with_its_measurements_and_report(tmp_path, script):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, str(EXAMPLES / script), "--small", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
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
