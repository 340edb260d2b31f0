"""``report.html``: one self-contained page per run or sweep, written next to the data.

Everything is inline (CSS, PNG figures as base64 data URIs); the page needs no network, no JavaScript
and no other file, so it can be mailed, archived or opened from a cluster's scratch disk. A sweep's page
links to each run's page (relative links inside the sweep directory).
"""

from __future__ import annotations

import base64
import html
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import yaml

from sgdscope import tables
from sgdscope.plots import FIGURES, draw, run_figures, skipped_run_figures, sweep_figures
from sgdscope.store import RunStore
from sgdscope.sweepview import SweepView, is_sweep, open_sweep, symbol

REPORT = "report.html"

_BN = {
    "eval": "running statistics (the model in eval mode)",
    "train-restore": "batch statistics, as SGD sees them; running statistics, dropout and random state are saved "
                     "before each measurement and restored after it",
    "train": "batch statistics with the running statistics updated, as in the original scripts (this perturbs "
             "the BN buffers)",
}
_HEADLINE = ["best val accuracy", "test accuracy at best val", "peak λ₁ (5-point smoothed)", "final η·λ₁",
             "k_min along e1, 1% rise", "barriers crossed"]
_TITLES = {"learning_curves": "Learning curves", "eigenvalues": "Hessian eigenvalues", "bowl": "The bowl along eᵢ",
           "alpha_step": "Step length along eᵢ (α-steps)", "k_min": "Bowl width k_min",
           "alignment": "Gradient alignment", "walk": "The walk between iterates",
           "sweep_curves": "Learning curves of all runs", "peak_lambda": "Peak λ₁ across the grid",
           "cosine_distance": "Cosine and distance across the grid", "cosine_curves": "Cosine and distance over training",
           "variants": "Subspace variants", "nsgd": "Nudged-SGD per γ", "gd_vs_noise": "GD vs isotropic noise",
           "schedules": "Learning-rate schedules"}

CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f5f7fb;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.wrap{max-width:1180px;margin:0 auto;padding:0 24px}
header.hero{background:linear-gradient(135deg,#1e3a8a 0%,#2563eb 55%,#0891b2 100%);color:#fff;padding:26px 0 22px}
header.hero h1{margin:4px 0 6px;font-size:26px;font-weight:700;letter-spacing:-.01em}
header.hero .kicker{text-transform:uppercase;letter-spacing:.12em;font-size:11.5px;opacity:.8}
header.hero .sub{opacity:.9;font-size:14px}
header.hero a{color:#e0f2fe}
nav{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.94);border-bottom:1px solid var(--line)}
nav .wrap{display:flex;gap:20px;padding-top:10px;padding-bottom:10px;font-size:13.5px;overflow-x:auto}
nav a{color:var(--muted);text-decoration:none;white-space:nowrap}
nav a:hover{color:var(--accent)}
h2{font-size:19px;margin:30px 0 10px;letter-spacing:-.01em}
h3{font-size:15.5px;margin:0 0 4px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 20px;margin:14px 0;
 box-shadow:0 1px 2px rgba(15,23,42,.04)}
.caption{color:var(--muted);font-size:13.5px;margin:0 0 12px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px 28px;margin:0}
.facts dt{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.06em}
.facts dd{margin:0 0 2px;font-weight:500}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:12px 16px}
.tile .v{font-size:23px;font-weight:700;font-variant-numeric:tabular-nums}
.tile .k{color:var(--muted);font-size:12.5px}
.tile .d{color:var(--muted);font-size:11.5px}
.note{border-left:4px solid var(--accent);background:#eff6ff;padding:12px 16px;border-radius:8px;font-size:14px}
.note p{margin:4px 0}
.warn{border-left:4px solid #dc2626;background:#fef2f2;padding:10px 14px;border-radius:8px;font-size:13.5px}
.badge{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12px;font-weight:600;vertical-align:middle}
.done{background:#dcfce7;color:#166534}.running{background:#dbeafe;color:#1e40af}
.failed{background:#fee2e2;color:#991b1b}.interrupted{background:#fef3c7;color:#92400e}
.pending{background:#f1f5f9;color:#475569}
.hero .badge{background:rgba(255,255,255,.18);color:#fff}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{font-weight:600;color:#334155;background:#f8fafc}
th:first-child,td:first-child,td.text,th.text{text-align:left}
td.detail{color:var(--muted);text-align:left;white-space:normal}
tr.section td{background:#f8fafc;font-weight:600;text-align:left;color:#334155}
figure{margin:0}
figure img{display:block;max-width:100%;height:auto;margin:8px auto 0}
pre{background:#0f172a;color:#e2e8f0;padding:14px 16px;border-radius:10px;overflow:auto;font-size:12.5px;line-height:1.45}
details summary{cursor:pointer;color:var(--accent);font-weight:600}
a{color:var(--accent)}
footer{color:var(--muted);font-size:12.5px;padding:26px 0 40px}
"""


# ------------------------------------------------------------------------------------------- pieces


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(path.stem)}" loading="eager">'


def _table(df: pd.DataFrame, index: bool = True, links: Optional[dict[str, str]] = None) -> str:
    """An HTML table of ``df`` with cells formatted like the Markdown writer; ``links`` maps index labels
    to hrefs."""
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for idx, row in df.iterrows():
        cells = []
        if index:
            label = _e(tables.fmt(idx))
            href = (links or {}).get(str(idx))
            cells.append(f'<td><a href="{_e(href)}">{label}</a></td>' if href else f"<td>{label}</td>")
        cells += [f'<td class="{"text" if isinstance(v, str) else ""}">{_e(tables.fmt(v))}</td>' for v in row.tolist()]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _page(title: str, hero: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page must load nothing from outside itself
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="hero"><div class="wrap">{hero}</div></header>'
        f'<nav><div class="wrap">{links}</div></nav>'
        f'<main class="wrap">{body}</main>'
        f'<footer class="wrap">Written by sgdscope on {time.strftime("%Y-%m-%d %H:%M")}. Every number and figure on '
        "this page is read from the run store next to it.</footer></body></html>\n"
    )


def _figure_cards(names: Iterable[str], target: Any, out_dir: Path) -> str:
    """One card per figure. A figure that fails is reported in its card, so one odd table cannot cost the
    whole report (the error is also printed on stderr)."""
    cards = []
    for name in names:
        fig = FIGURES[name]
        try:
            imgs = "".join(f"<figure>{_img(p)}</figure>" for p in draw(name, target, out_dir))
        except Exception as err:  # noqa: BLE001
            print(f"sgdscope: report: figure {name!r} failed: {type(err).__name__}: {err}", file=sys.stderr)
            imgs = f'<div class="warn">This figure could not be drawn: {_e(type(err).__name__)}: {_e(err)}</div>'
        cards.append(f'<section class="card" id="fig-{name}"><h3>{_e(_TITLES.get(name, name))}</h3>'
                     f'<p class="caption">{_e(fig.description)}</p>{imgs}</section>')
    return "".join(cards)


def _config_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _count(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) and not (isinstance(n, float) and math.isnan(n)) else "?"


# ---------------------------------------------------------------------------------------------- a run


def _dl(items: list[tuple[str, str]], cfg: dict[str, Any]) -> str:
    """A facts list of ``items`` followed by where the run ran: seed, device and versions."""
    ver = cfg.get("versions") or {}
    items = items + [("seed · device", f"{cfg.get('seed', '?')} · {ver.get('device', cfg.get('device', '?'))}"),
                     ("versions", f"sgdscope {ver.get('sgdscope', '?')} · torch {ver.get('torch', '?')}")]
    return '<dl class="facts">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in items) + "</dl>"


def _skipped(why: dict[str, str]) -> str:
    """The figures a run has no data for, each with the table or column it needs and what writes it."""
    if not why:
        return ""
    items = "".join(f"<li><b>{_e(_TITLES.get(n, n))}</b> (<code>{_e(n)}</code>): {_e(w)}</li>" for n, w in why.items())
    return f'<div class="card caption">Not drawn, for want of data:<ul>{items}</ul></div>'


def _facts(cfg: dict[str, Any], status: dict[str, Any]) -> str:
    res = cfg.get("resolved") or {}
    if not any(k in cfg for k in ("data", "model", "optimizer")):  # a user's own loop: what its config records
        return _dl([("source", "your own training loop, measured by sgdscope.Scope" if cfg.get("source") == "scope"
                     else str(cfg.get("source", "a config without data, model or optimizer sections"))),
                    ("probes", ", ".join(k for k, v in (cfg.get("probes") or {}).items() if v is not None) or "none"),
                    ("now at", f"step {status.get('step', '?')}")], cfg)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    opt, sched, train = cfg.get("optimizer") or {}, cfg.get("schedule") or {}, cfg.get("train") or {}
    arch = model.get("name", "?") + (f" {model['widths']}" if model.get("name") == "mlp" and model.get("widths") else "")
    arch += " + BatchNorm" if model.get("batchnorm") else ""
    optim = f"{opt.get('name', '?')}, η = {opt.get('lr', '?')}"
    if opt.get("name") not in ("gd", "noisy_gd"):
        optim += f", batch {opt.get('batch_size', '?')}"
    optim += "".join(f", {label} {opt[k]}" for k, label in (("momentum", "momentum"), ("weight_decay", "L2 λ"))
                     if opt.get(k))
    if opt.get("name") == "nsgd":
        optim += f", γ = {opt.get('gamma')}, K = {opt.get('k')}, mode {opt.get('mode')}"
    if opt.get("name") == "noisy_gd":
        optim += f", noise factor {opt.get('noise_factor')} ({opt.get('noise_scales', 'std')})"
    items = [
        ("data", f"{data.get('name', '?')}: {_count(res.get('n_train'))} train / {_count(res.get('n_val'))} val / "
                 f"{_count(res.get('n_test'))} test" + (", augmented" if data.get("augment") else "")),
        ("model", f"{arch} · {_count(res.get('n_params'))} parameters"),
        ("optimizer", optim),
        ("schedule", sched.get("name", "constant")),
        ("training", f"{train.get('epochs', '?')} epochs × {_count(res.get('steps_per_epoch'))} steps; now at "
                     f"step {status.get('step', '?')}"),
    ]
    return _dl(items, cfg)


def _measurement_note(cfg: dict[str, Any]) -> str:
    res, meas = cfg.get("resolved") or {}, cfg.get("measure") or {}
    probes = cfg.get("probes") or {}
    policy = res.get("bn_policy") or meas.get("bn_policy", "train-restore")
    m, n = res.get("measure_subset_size", meas.get("subset_size")), res.get("n_train")
    share = f" ({m / n:.0%} of {n:,})" if isinstance(m, int) and isinstance(n, int) and n else ""
    l2 = "yes" if res.get("l2_in_measurements") else "no"
    parts = [
        f"<p><b>Measurement subset.</b> Curvature and landscape measurements (eigenvalues, the loss along "
        f"eigenvectors, α-steps, alignment) use a fixed subset of <b>{_count(m)}</b> training examples{share}, "
        "drawn once from the run's seed and stored in <code>tensors/measure_subset.safetensors</code>.</p>",
        f"<p><b>BatchNorm during measurements:</b> <code>{_e(policy)}</code>: {_e(_BN.get(policy, ''))}.</p>",
    ]
    if "l2_in_measurements" in res or "data" in cfg:  # an own loop's config need not say; then the page does not
        parts.append(f"<p><b>L2 term in measured losses and Hessians:</b> {l2}.</p>")
    interp = probes.get("interpolation")
    if isinstance(interp, dict):
        where = "the whole training set" if interp.get("subset", "full") == "full" else "the measurement subset"
        parts.append(f"<p><b>Interpolation</b> losses (the walk) are computed on {where}, "
                     f"height measured from the <code>{_e(interp.get('height', 'start'))}</code> iterate.</p>")
    if res.get("grad_cosine_includes_l2"):
        parts.append("<p>Gradient cosines use the gradient actually applied, L2 term included.</p>")
    return '<div class="note">' + "".join(parts) + "</div>"


def _tiles(summary: pd.DataFrame) -> str:
    rows = summary.set_index("quantity")
    tiles = []
    for q in _HEADLINE:
        if q in rows.index:
            v, d = rows.loc[q, "value"], rows.loc[q, "detail"]
            text = f"{v:.1%}" if "accuracy" in q and not math.isnan(v) else tables.fmt(v)
            tiles.append(f'<div class="tile"><div class="k">{_e(q)}</div><div class="v">{_e(text)}</div>'
                         f'<div class="d">{_e(d)}</div></div>')
    return f'<div class="tiles">{"".join(tiles)}</div>' if tiles else ""


def _summary_table(summary: pd.DataFrame) -> str:
    body = []
    for section, g in summary.groupby("section", sort=False):
        body.append(f'<tr class="section"><td colspan="3">{_e(section)}</td></tr>')
        body += [f"<tr><td>{_e(r.quantity)}</td><td>{_e(tables.fmt(r.value))}</td>"
                 f'<td class="detail">{_e(r.detail)}</td></tr>' for r in g.itertuples()]
    return ('<div class="tablewrap"><table><thead><tr><th>quantity</th><th>value</th><th class="text">detail</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _badge(state: str) -> str:
    return f'<span class="badge {_e(state)}">{_e(state)}</span>'


def run_report(store: RunStore, up: Optional[str] = None) -> Path:
    """Write ``report.html`` of one run (``up``: a link back to the sweep page, if any)."""
    cfg, status = store.config(), store.status()
    state = status.get("state", "?")
    names = run_figures(store)
    skipped = skipped_run_figures(store)
    summary = tables.run_summary(store)
    back = f'<a href="{_e(up)}">← sweep</a> · ' if up else ""
    hero = (f'<div class="kicker">{back}sgdscope run report</div><h1>{_e(store.path.name)}</h1>'
            f'<div class="sub">{_badge(state)}&nbsp; epoch {_e(status.get("epoch", "?"))}, step '
            f'{_e(status.get("step", "?"))} · {_e(store.path.resolve())}</div>')
    error = f'<div class="warn"><b>This run failed:</b> {_e(status["error"])}</div>' if status.get("error") else ""
    body = [
        error,
        f'<h2 id="overview">Overview</h2><div class="card">{_facts(cfg, status)}</div>',
        _measurement_note(cfg),
        '<h2 id="summary">Summary numbers</h2>',
        _tiles(summary) or '<div class="card caption">No rows yet.</div>',
        '<h2 id="figures">Figures</h2>',
        _figure_cards(names, store, store.path / "figures") or '<div class="card caption">No figure has data yet.</div>',
        _skipped(skipped),
        f'<h2 id="numbers">All summary numbers</h2><div class="card">{_summary_table(summary)}</div>' if len(summary)
        else "",
        '<h2 id="config">Configuration</h2><div class="card"><details open><summary>config.yaml (resolved)</summary>'
        f"<pre>{_e(_config_yaml({k: v for k, v in cfg.items() if k not in ('versions', 'resolved')}))}</pre>"
        f"</details><details><summary>resolved sizes and versions</summary><pre>"
        f"{_e(_config_yaml({k: cfg[k] for k in ('resolved', 'versions') if k in cfg}))}</pre></details></div>",
    ]
    nav = [("overview", "Overview"), ("summary", "Summary")] + [(f"fig-{n}", _TITLES.get(n, n)) for n in names] + (
        [("numbers", "All numbers")] if len(summary) else []) + [("config", "Config")]
    path = store.path / REPORT
    path.write_text(_page(f"sgdscope · {store.path.name}", hero, nav, "".join(body)), encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------- a sweep


def _runs_table(view: SweepView) -> tuple[pd.DataFrame, dict[str, str]]:
    rows, links = {}, {}
    for m in view.members:
        row: dict[str, Any] = {symbol(k): m.params.get(k) for k in view.grid}
        if m.store is None:
            row["status"] = "pending"
        else:
            st = m.store.status()
            row["status"] = st.get("state", "?")
            ep = m.store.table("epoch")
            best = tables.best_val_row(ep)
            if tables.has(ep, "epoch"):
                row["epochs"] = tables.last_epoch(ep)
            if tables.has(ep, "train_loss"):
                row["train loss"] = float(ep["train_loss"].iloc[-1])
            if best is not None:
                row["best val acc"] = float(best["val_acc"])
                row["test acc @best"] = tables.cell(best, "test_acc")
            pk = tables.peak_lambda(m.store)
            if not math.isnan(pk["peak"]):
                row["peak λ₁"] = pk["peak"]
            row["mean cos"] = tables.mean_cosine(m.store)
            row["‖θ−θ₀‖"] = tables.final_distance(m.store)
            if (m.path / REPORT).is_file():
                links[m.name] = f"{m.path.relative_to(view.path).as_posix()}/{REPORT}"
        rows[m.name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "run"
    return df, links


def _sweep_tables(view: SweepView) -> str:
    """The papers' tables for the sweep, also written as Markdown and CSV under ``SWEEP/tables``."""
    runs = tables.as_runs(view.path)
    has = lambda t: any(t in s.tables() for s in runs.values())  # noqa: E731
    made = []
    if has("curvature") and has("epoch"):
        made.append(("jastrzebski_table1", "Jastrzebski et al., Table 1", tables.jastrzebski_table1(runs),
                     "‖H‖_F (top-K, 5-point smoothed) at the best-validation epoch / mean over the last 10 epochs; "
                     "test accuracy at the best-validation epoch; validation accuracy at epoch 50 (a shorter run: at "
                     "its last epoch, as the columns say); "
                     "mean training loss over the last 10 epochs; ‖θ−θ₀‖ and ρ(W) at the best-validation epoch."))
    if has("valley"):
        made.append(("xing_table1_barriers", "Xing et al., Table 1: barriers crossed per epoch",
                     tables.barriers_per_epoch(runs), "Steps per epoch whose interpolation rose above both iterates."))
        made.append(("xing_table2_heights", "Xing et al., Table 2: mean height above the valley floor",
                     tables.heights_per_epoch(runs), "Mean of L(θ_t) − min_α L over the interpolated steps of each epoch."))
    cards = []
    for slug, heading, df, caption in made:
        for ext in ("md", "csv"):
            tables.write_table(df, view.path / "tables" / f"{slug}.{ext}")
        files = f'<a href="tables/{slug}.md">Markdown</a> · <a href="tables/{slug}.csv">CSV</a>'
        cards.append(f'<section class="card"><h3>{_e(heading)}</h3><p class="caption">{_e(caption)} ({files})</p>'
                     f"{_table(df)}</section>")
    return "".join(cards)


def sweep_report(view: SweepView) -> Path:
    """Write every started run's report, then the sweep's ``report.html`` linking to them."""
    for m in view.started():
        run_report(m.store, up=Path(*[".."] * len(m.path.relative_to(view.path).parts), REPORT).as_posix())
    runs_df, links = _runs_table(view)
    states = runs_df["status"].value_counts() if len(runs_df) else pd.Series(dtype=int)
    grid = " × ".join(f"{symbol(k)} ∈ {{{', '.join(map(str, v))}}}" for k, v in view.grid.items()) or "one point"
    hero = (f'<div class="kicker">sgdscope sweep report</div><h1>{_e(view.path.name)}</h1>'
            f'<div class="sub">{_e(grid)} → {len(view.members)} runs · '
            + " ".join(f"{_badge(s)} {n}" for s, n in states.items()) + "</div>")
    names = sweep_figures(view)
    body = [
        '<h2 id="runs">Runs</h2>',
        f'<div class="card"><p class="caption">Each name links to that run\'s own report.</p>{_table(runs_df, links=links)}</div>',
        '<h2 id="figures">Comparisons</h2>',
        _figure_cards(names, view, view.path / "figures") or '<div class="card caption">No run has data yet.</div>',
    ]
    tabs = _sweep_tables(view)
    if tabs:
        body += ['<h2 id="tables">Tables</h2>', tabs]
    body.append('<h2 id="config">Configuration</h2><div class="card"><details open><summary>base config and grid'
                f"</summary><pre>{_e(_config_yaml({'grid': view.grid, 'base': view.base}))}</pre></details></div>")
    nav = [("runs", "Runs")] + [(f"fig-{n}", _TITLES.get(n, n)) for n in names] + (
        [("tables", "Tables")] if tabs else []) + [("config", "Config")]
    path = view.path / REPORT
    path.write_text(_page(f"sgdscope · {view.path.name}", hero, nav, "".join(body)), encoding="utf-8")
    return path


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` into a run or sweep directory and return its path (a sweep also gets one
    per run)."""
    return sweep_report(open_sweep(path)) if is_sweep(path) else run_report(RunStore(path))
