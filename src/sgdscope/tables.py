"""The papers' tables and a run's summary numbers, computed from run stores as pandas DataFrames.

* :func:`jastrzebski_table1`: Table 1 of Jastrzebski et al. (2019), one row per run of a set.
* :func:`barriers_per_epoch` / :func:`heights_per_epoch`: Tables 1 and 2 of Xing et al. (2018).
* :func:`run_summary`: the numbers a run's report leads with (peak λ₁ and when, k_min, α-step changes,
  barrier counts and heights).

Writers: :func:`to_markdown` and :func:`write_table` (``.md`` or ``.csv`` by suffix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sgdscope.errors import ConfigError
from sgdscope.store import RunStore
from sgdscope.sweepview import is_sweep, open_sweep

Runs = Mapping[str, "RunStore | str | Path"] | Sequence[tuple[Mapping[str, Any], "RunStore | str | Path"]] | str | Path

LAST_POINTS = 25  # Jastrzebski: k_min and α-step numbers are means over the last 25 logged points
VAL_EPOCH = 50  # Jastrzebski Table 1 reads the validation accuracy at epoch 50
SMOOTH = 5  # Jastrzebski: curvature traces are smoothed with a 5-point box filter before peaks are read


@dataclass(frozen=True)
class TimeAxis:
    """Maps a step count to the x coordinate figures use: epochs (fractional) when the run says how many
    steps make an epoch, otherwise raw steps."""

    steps_per_epoch: float | None

    @property
    def label(self) -> str:
        return "epoch" if self.steps_per_epoch else "step"

    def __call__(self, step: Any) -> Any:
        return np.asarray(step, dtype=float) / self.steps_per_epoch if self.steps_per_epoch else np.asarray(step, dtype=float)


def has(df: pd.DataFrame, *columns: str) -> bool:
    """Whether ``df`` has rows and every one of ``columns`` (a run from a user's own loop may hold any
    subset of a table's columns, so every reader asks before it reads)."""
    return bool(len(df)) and all(c in df for c in columns)


def time_axis(store: RunStore) -> TimeAxis:
    """The run's time axis: ``resolved.steps_per_epoch`` from its config, or inferred from its epoch table."""
    spe = (store.config().get("resolved") or {}).get("steps_per_epoch")
    if not spe:
        ep = store.table("epoch")
        if len(ep) and {"step", "epoch"} <= set(ep.columns) and ep["epoch"].iloc[0] > 0:
            spe = float(ep["step"].iloc[0]) / float(ep["epoch"].iloc[0])
    return TimeAxis(float(spe) if spe else None)


def smooth(values: Sequence[float] | pd.Series, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shorter at the ends), NaNs skipped."""
    s = pd.Series(np.asarray(values, dtype=float))
    if window <= 1:
        return s.to_numpy()
    return s.rolling(window, center=True, min_periods=1).mean().to_numpy()


def _override_label(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()) or "run"


def as_runs(runs: Runs) -> dict[str, RunStore]:
    """``{label: RunStore}`` from a sweep directory (labels from its grid), a single run directory, a
    mapping of labels to stores or paths, or a list of ``(overrides, store or path)`` pairs (labelled by
    their overrides). Labels that collide fall back to folder names, then to numbered labels."""
    def store_of(v: Any) -> RunStore:
        return v if isinstance(v, RunStore) else RunStore(v)

    if isinstance(runs, (str, Path)):
        if is_sweep(runs):
            pairs = [(m.label or m.name, m.store) for m in open_sweep(runs).started()]
        else:
            store = RunStore(runs)
            pairs = [(store.path.name, store)]
    elif isinstance(runs, Mapping):
        pairs = [(str(k), store_of(v)) for k, v in runs.items()]
    else:
        pairs = [(_override_label(overrides), store_of(path)) for overrides, path in runs]
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels):
        labels = [store.path.name for _, store in pairs]
        if len(set(labels)) != len(labels):
            labels = [f"{i}: {label}" for i, label in enumerate(labels)]
    return {label: store for label, (_, store) in zip(labels, pairs)}


def _nearest(df: pd.DataFrame, step: float, col: str) -> float:
    """``col`` at the row whose step is nearest to ``step`` (the earlier one on a tie); NaN if none."""
    if not has(df, "step", col):
        return math.nan
    i = (df["step"] - step).abs().to_numpy().argmin()
    return float(df[col].iloc[i])


def best_val_row(epochs: pd.DataFrame) -> pd.Series | None:
    """The epoch row with the highest validation accuracy (the first such epoch on a tie); None when the
    table has no ``val_acc`` values (a user's own ``epoch`` rows need not have one)."""
    if not has(epochs, "val_acc") or not epochs["val_acc"].notna().any():
        return None
    return epochs.loc[epochs["val_acc"].idxmax()]


def last_epoch(epochs: pd.DataFrame) -> int | None:
    """The number of the last logged epoch (None without an ``epoch`` column)."""
    if not has(epochs, "epoch") or not epochs["epoch"].notna().any():
        return None
    return int(epochs["epoch"].max())


def lambda1(store: RunStore) -> pd.DataFrame:
    """λ₁ per measured step: columns ``step``, ``value`` (empty when the run has no eigen rows, or rows
    without the step, index or value columns)."""
    eig = store.table("eigen")
    if not has(eig, "step", "index", "value"):
        return pd.DataFrame(columns=["step", "value"])
    return eig[eig["index"] == 1].groupby("step", as_index=False)["value"].mean()


def peak_lambda(store: RunStore, window: int = SMOOTH) -> dict[str, float]:
    """The peak of λ₁ along the run, read from a ``window``-point smoothed trace (argmax alone is noisy).

    Keys: ``peak`` (smoothed max), ``peak_step``, ``peak_epoch``, ``t90_step``/``t90_epoch`` (the first
    time the smoothed λ₁ reaches 90% of its peak), ``raw_max`` and ``final``. All NaN without eigen rows.
    """
    lam = lambda1(store)
    keys = ("peak", "peak_step", "peak_epoch", "t90_step", "t90_epoch", "raw_max", "final")
    s = smooth(lam["value"], window)
    if not np.isfinite(s).any():  # no rows, or only non-finite values: there is no peak to read
        return dict.fromkeys(keys, math.nan)
    steps = lam["step"].to_numpy(dtype=float)
    i = int(np.nanargmax(s))
    j = int(np.argmax(s >= 0.9 * s[i])) if s[i] > 0 else i
    t = time_axis(store)
    return {"peak": float(s[i]), "peak_step": steps[i], "peak_epoch": float(t(steps[i])), "t90_step": steps[j],
            "t90_epoch": float(t(steps[j])), "raw_max": float(lam["value"].max()), "final": float(lam["value"].iloc[-1])}


def mean_cosine(store: RunStore) -> float:
    """Mean cosine of consecutive minibatch gradients over the run (Xing Fig. 4)."""
    tr = store.table("train")
    return float(tr["grad_cosine_prev"].mean()) if has(tr, "grad_cosine_prev") else math.nan


def final_distance(store: RunStore) -> float:
    """‖θ − θ₀‖ at the last logged step."""
    tr = store.table("train")
    d = tr["param_distance"].dropna() if has(tr, "param_distance") else ()
    return float(d.iloc[-1]) if len(d) else math.nan


# --------------------------------------------------------------------------------- Jastrzebski Table 1


def cell(row: pd.Series | None, col: str) -> float:
    """``row[col]`` as a float, NaN where the row or the column is missing."""
    return float(row[col]) if row is not None and col in row and pd.notna(row[col]) else math.nan


def _table1_row(store: RunStore, window: int) -> dict[str, float]:
    """One run's row of Table 1; columns the run's tables cannot give are NaN, never an error."""
    ep = store.table("epoch")
    if not has(ep, "epoch"):
        return {}
    best = best_val_row(ep)
    row: dict[str, float] = {"best-val epoch": int(best["epoch"]) if best is not None else math.nan}
    curv = store.table("curvature")
    frob_best = frob_last = math.nan
    if has(curv, "step", "frobenius_topk"):
        curv = curv.assign(frob=smooth(curv["frobenius_topk"], window))
        if best is not None and "step" in best:
            frob_best = _nearest(curv, best["step"], "frob")
        if "epoch" in curv:
            frob_last = float(curv.loc[curv["epoch"] > ep["epoch"].max() - 10, "frob"].mean())
    row.update({"‖H‖_F best-val": frob_best, "‖H‖_F last-10": frob_last, "test acc": cell(best, "test_acc")})
    if has(ep, "val_acc"):
        # The paper reads epoch 50; a shorter run is read at its last epoch, and the table says which.
        at = ep[ep["epoch"] == VAL_EPOCH]
        used = (at if len(at) else ep.tail(1)).iloc[0]
        row["val acc"], row["val acc epoch"] = cell(used, "val_acc"), int(used["epoch"])
    row["loss last-10"] = float(ep["train_loss"].tail(10).mean()) if "train_loss" in ep else math.nan
    row["dist. best-val"] = (_nearest(store.table("train"), best["step"], "param_distance")
                             if best is not None and "step" in best else math.nan)
    row["ρ(W)"] = cell(best, "weight_spectral_norm_mean")
    return row


def jastrzebski_table1(runs: Runs, window: int = SMOOTH) -> pd.DataFrame:
    """Table 1 of Jastrzebski et al. (2019), one row per run.

    Columns: the best-validation epoch; ‖H‖_F (√Σ top-K λ², ``window``-point smoothed as in the authors'
    code) at that epoch and its mean over the last 10 epochs; test accuracy at the best-validation epoch;
    validation accuracy at epoch 50 (a shorter run: at its last epoch N), in a column ``val acc @ epoch N``
    when every run was read at the same N, else in ``val acc @ epoch 50 or the last`` beside a column
    ``val acc epoch`` with each run's N (the label says what was read); mean training loss over the
    last 10 epochs; ‖θ − θ₀‖ at the best-validation epoch; mean spectral norm of the weight matrices
    ρ(W) at the best-validation epoch (the paper evaluates its best-validation checkpoint).
    """
    rows = {label: _table1_row(store, window) for label, store in as_runs(runs).items()}
    df = pd.DataFrame.from_dict({k: v for k, v in rows.items() if v}, orient="index")
    if "val acc epoch" in df:
        read_at = df["val acc epoch"].dropna().unique()
        if len(read_at) == 1:
            df = df.drop(columns="val acc epoch").rename(columns={"val acc": f"val acc @ epoch {int(read_at[0])}"})
        else:
            df = df.rename(columns={"val acc": f"val acc @ epoch {VAL_EPOCH} or the last"})
    df.index.name = "run"
    return df


# ------------------------------------------------------------------------------------- Xing Tables 1, 2


def _per_epoch(runs: Runs, column: str, how: str) -> pd.DataFrame:
    rows = {}
    for label, store in as_runs(runs).items():
        v = store.table("valley")
        if has(v, "epoch", column):  # rows without an epoch column cannot be put in a per-epoch table
            rows[label] = v.groupby("epoch")[column].agg(how)
    df = pd.DataFrame.from_dict(rows, orient="index")
    if len(df):
        df = df[sorted(df.columns)]
        df.columns = [f"epoch {int(e)}" for e in df.columns]
    df.index.name = "run"
    return df


def barriers_per_epoch(runs: Runs) -> pd.DataFrame:
    """Xing Table 1: the number of steps per epoch whose interpolation crossed a barrier (per run)."""
    df = _per_epoch(runs, "barrier", "sum")
    return df.astype("Int64") if len(df) else df


def heights_per_epoch(runs: Runs) -> pd.DataFrame:
    """Xing Table 2: the mean height of the iterate above the valley floor, per epoch (per run)."""
    return _per_epoch(runs, "height", "mean")


# ------------------------------------------------------------------------------------------ run summary


def last_points(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The rows of the last ``n`` logged steps."""
    steps = np.sort(df["step"].unique())[-n:]
    return df[df["step"].isin(steps)]


def run_summary(store: RunStore, last: int = LAST_POINTS) -> pd.DataFrame:
    """The headline numbers of a run as rows of (section, quantity, value, detail).

    Sections present depend on the run's tables: training, curvature (peak λ₁ and when, η·λ₁ against 2),
    k_min and α-step (means over the last ``last`` logged points), and the walk (barriers, heights). A row
    whose table or column the run lacks is left out, so a run from a user's own loop with a handful of
    columns gets the rows it has the data for and no error.
    """
    rows: list[tuple[str, str, float, str]] = []
    ep, tr = store.table("epoch"), store.table("train")
    rows += _training_rows(ep, tr, store)
    pk = peak_lambda(store)
    if not math.isnan(pk["peak"]):
        lam = lambda1(store)
        lr = _nearest(tr, lam["step"].iloc[-1], "lr")
        if math.isnan(lr):  # no lr column in train: the config's constant lr, where there is one
            lr = float((store.config().get("optimizer") or {}).get("lr", math.nan))
        rows += [
            ("curvature", "peak λ₁ (5-point smoothed)", pk["peak"],
             f"epoch {pk['peak_epoch']:.3g} (step {int(pk['peak_step'])}); raw max {pk['raw_max']:.4g}"),
            ("curvature", "time to 90% of peak λ₁", pk["t90_epoch"], f"step {int(pk['t90_step'])}"),
            ("curvature", "final λ₁", pk["final"], f"step {int(lam['step'].iloc[-1])}"),
        ]
        if not math.isnan(lr):
            rows.append(("curvature", "final η·λ₁", lr * pk["final"], "GD on a quadratic diverges along e₁ above 2"))
        curv = store.table("curvature")
        if has(curv, "frobenius_topk"):
            rows.append(("curvature", "final ‖H‖_F (top-K)", float(curv["frobenius_topk"].iloc[-1]),
                         f"K = {int(curv['k'].iloc[-1])}" if "k" in curv else ""))
    km = store.table("k_min")
    if has(km, "step", "eigen_index", "threshold", "k_min"):
        tail = last_points(km, last)
        for (i, th), g in tail.groupby(["eigen_index", "threshold"]):
            closed = int(g["k_min"].notna().sum())
            rows.append(("k_min", f"k_min along e{int(i)}, {th:.0%} rise", float(g["k_min"].mean()),
                         f"mean of last {g['step'].nunique()} points; bowl closed at {closed}"))
    al = store.table("alpha_step")
    if has(al, "step", "eigen_index", "alpha", "relative_change"):
        if "direction" not in al:  # the probe names them; a user's rows may only number them (0: random)
            al = al.assign(direction=["random" if i == 0 else f"e{int(i)}" for i in al["eigen_index"]])
        tail = last_points(al, last)
        for (d, a), g in tail.groupby(["direction", "alpha"], sort=True):
            rows.append(("α-step", f"α = {a:g} along {d}: loss change", 100 * float(g["relative_change"].mean()),
                         f"% of L(θ); mean of last {g['step'].nunique()} points"))
    rows += _walk_rows(store.table("valley"))
    from sgdscope.summaries import extra_rows  # its modules import this one's helpers

    rows += extra_rows(store)
    return pd.DataFrame(rows, columns=["section", "quantity", "value", "detail"])


def _training_rows(ep: pd.DataFrame, tr: pd.DataFrame, store: RunStore) -> list[tuple[str, str, float, str]]:
    rows = []
    if has(ep, "epoch"):
        last_ep, best = ep.iloc[-1], best_val_row(ep)
        at = f"epoch {int(last_ep['epoch'])}"
        if "train_loss" in ep:
            rows.append(("training", "final train loss", float(last_ep["train_loss"]), at))
        if best is not None:
            where = f"epoch {int(best['epoch'])}"
            rows += [("training", "final val accuracy", cell(last_ep, "val_acc"), at),
                     ("training", "best val accuracy", float(best["val_acc"]), where)]
            if "test_acc" in ep:
                rows.append(("training", "test accuracy at best val", cell(best, "test_acc"), where))
    if has(tr, "step", "param_distance"):
        rows.append(("training", "distance from init ‖θ−θ₀‖", final_distance(store), f"step {int(tr['step'].iloc[-1])}"))
    if has(tr, "grad_cosine_prev"):
        rows.append(("training", "mean cos(g_t−1, g_t)", mean_cosine(store), f"over {len(tr)} steps"))
    return rows


def _walk_rows(va: pd.DataFrame) -> list[tuple[str, str, float, str]]:
    if not has(va, "barrier"):
        return []
    rows = [("walk", "barriers crossed", float(va["barrier"].sum()), f"of {len(va)} interpolated steps")]
    if has(va, "epoch", "height"):
        for e, g in va.groupby("epoch"):
            detail = f"barriers {int(g['barrier'].sum())}/{len(g)}"
            if "interior_min" in g:
                detail += f"; interior minimum at {int(g['interior_min'].sum())}"
            rows.append(("walk", f"epoch {int(e)}: mean height above floor", float(g["height"].mean()), detail))
    return rows


# --------------------------------------------------------------------------------------------- writers


def fmt(value: Any) -> str:
    """A table cell: integers as such, floats to 4 significant digits, missing values as an em dash."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.4g}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df``, its index as the first column."""
    header = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for idx, row in df.iterrows():
        cells = [fmt(idx)] + [fmt(v).replace("|", "\\|") for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as Markdown (``.md``) or CSV (``.csv``), chosen by the suffix of ``path``."""
    path = Path(path)
    if path.suffix not in (".md", ".csv"):
        raise ConfigError(f"{path}: a table is written as .md or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".md":
        path.write_text(to_markdown(df), encoding="utf-8")
    else:
        df.to_csv(path)
    return path
