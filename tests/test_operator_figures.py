"""The read side of issue 13's items 5 and 6 on stores written by a Scope in an own loop: the
``curvature_kinds`` sweep figure, the ``slice2d`` run figure, their report lines and claims."""

from __future__ import annotations

import torch.nn.functional as F
import yaml

from sgdscope import Scope
from sgdscope.claims import check
from sgdscope.plots import draw, missing, run_figures
from sgdscope.store import RunStore
from sgdscope.summaries import extra_rows
from sgdscope.sweepview import open_sweep


def test_figures_report_lines_and_claims_from_own_loop_stores(tmp_path, monkeypatch):
    from test_scope import data, fresh, loop

    (u, v), y = data(seed=1)
    runs = []
    for curv in ("hessian", "ggn"):
        name = f"curvature={curv}"
        model, opt = fresh()
        probes = {"eigen": {"every": 2, "k": 2, "tol": 0.05, "max_hvps": 60, "curvature": curv},
                  "slice2d": {"every": 2, "grid": 5, "span": 0.3}}
        with Scope(model, F.mse_loss, ((u, v), y), out=tmp_path / "runs" / name, probes=probes, seed=3) as scope:
            loop(model, opt, 4, scope)
        runs.append({"name": name, "dir": f"runs/{name}", "overrides": {"probes.eigen.curvature": curv}})
    spec = {"format": 1, "base": {}, "grid": {"probes.eigen.curvature": ["hessian", "ggn"]}, "seeds": 1, "runs": runs}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    view = open_sweep(tmp_path)
    assert missing("curvature_kinds", view) is None
    assert [p.name for p in draw("curvature_kinds", view, tmp_path / "figures")] == ["curvature_kinds.png"]
    store = RunStore(tmp_path / "runs" / "curvature=ggn")
    assert "slice2d" in run_figures(store)
    assert [p.name for p in draw("slice2d", store, tmp_path / "figures")] == ["slice2d.png"]
    sections = {r[0] for r in extra_rows(store)}
    assert {"curvature operator", "2-D slice"} <= sections
    assert not any(r[0] == "curvature operator" for r in extra_rows(RunStore(tmp_path / "runs" / "curvature=hessian")))
    # the eigenvalue figure names the operator the run tracked
    from sgdscope.plots import sharpest

    titles = []
    monkeypatch.setattr(sharpest, "title", lambda fig, text, *a: titles.append(text))
    for curv in ("ggn", "hessian"):
        draw("eigenvalues", RunStore(tmp_path / "runs" / f"curvature={curv}"), tmp_path / "figures")
    assert titles[0].startswith("Gauss–Newton eigenvalues") and titles[1].startswith("Hessian eigenvalues")
    g = check("ggn-fisher", tmp_path)
    assert g.checks["every run followed the same trajectory (identical batch losses)"]
    assert set(g.numbers.index) == {"hessian", "ggn"}
    s = check("loss-slice", tmp_path)
    assert len(s.numbers) == 2 and s.numbers["step"].tolist() == [4, 4]
