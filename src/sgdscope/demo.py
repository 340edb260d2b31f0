"""``sgdscope demo``: a tour of both papers on the embedded digits set, in a few minutes on 2 cores.

It sweeps two learning rates of an MLP on scikit-learn's digits with the sharpest-direction probes
(top-3 Hessian eigenpairs, the loss along e₁ in units of the SGD step, α-scaled steps) and the walk
probes (interpolation between consecutive iterates of the first and last epochs, valley floor, height,
barriers), writes a sweep report with every figure and prints the headline numbers.
"""

from __future__ import annotations

from pathlib import Path

import typer

LRS = [0.05, 0.5]
EPOCHS = 10

DEMO_CONFIG = {
    "seed": 0,
    "device": "auto",
    "data": {"name": "digits", "flatten": True},
    "model": {"name": "mlp", "widths": [64, 64]},
    "optimizer": {"name": "sgd", "lr": 0.1, "batch_size": 64},
    "train": {"epochs": EPOCHS},
    "measure": {"subset": 0.5, "min_subset": 500},
    "probes": {
        "eigen": {"every": "epoch", "first_steps": 10, "k": 3, "tol": 1e-3},
        "direction": {"every": "epoch", "eigen_indices": [1, 3]},
        "alpha_step": {"every": "epoch", "eigen_indices": [1]},
        "interpolation": {"every": 1, "epochs": [1, EPOCHS]},
    },
}

_SHOWN = [
    ("training", "best val accuracy"),
    ("training", "test accuracy at best val"),
    ("training", "mean cos(g_t−1, g_t)"),
    ("training", "distance from init ‖θ−θ₀‖"),
    ("curvature", "peak λ₁ (5-point smoothed)"),
    ("curvature", "final η·λ₁"),
    ("k_min", "k_min along e1, 10% rise"),
    ("α-step", "α = 0.5 along e1: loss change"),
    ("α-step", "α = 2 along e1: loss change"),
    ("α-step", "α = 2 along random: loss change"),
    ("walk", "barriers crossed"),
    ("walk", "epoch 1: mean height above floor"),
]


def _headlines(out: Path) -> str:
    """A small table: one column per learning rate, the rows of ``_SHOWN`` (from the stores only)."""
    from sgdscope.store import RunStore
    from sgdscope.sweepview import run_name
    from sgdscope.tables import fmt, run_summary

    cols = []
    for lr in LRS:
        s = run_summary(RunStore(out / "runs" / run_name({"optimizer.lr": lr})))
        cols.append({(r.section, r.quantity): r.value for r in s.itertuples()})
    width = max(len(q) for _, q in _SHOWN) + 2
    lines = [f"  {'':{width}s}" + "".join(f"{'η = ' + str(lr):>14s}" for lr in LRS)]
    for key in _SHOWN:
        unit = " %" if key[0] == "α-step" else ""
        vals = "".join(f"{fmt(c.get(key, float('nan'))) + unit:>14s}" for c in cols)
        lines.append(f"  {key[1]:{width}s}{vals}")
    return "\n".join(lines)


def demo(out: Path) -> Path:
    """Run (or resume) the demo sweep into ``out``, write its report, print the headlines and the path."""
    from sgdscope.report import write_report
    from sgdscope.sweep import run_sweep

    typer.echo(f"sgdscope demo: MLP on digits, η ∈ {LRS}, {EPOCHS} epochs, Hessian + walk probes → {out}", err=True)
    run_sweep(DEMO_CONFIG, {"optimizer.lr": LRS}, out, backend="local", workers=min(2, len(LRS)))
    report = write_report(out)
    typer.echo(
        "\nWhat to look for. Jastrzebski et al.: a larger η keeps λ₁ lower (SGD needs η·λ₁ < 2), the loss along e₁"
        "\nis a bowl a few SGD steps wide, and α > 1 steps along e₁ raise the loss while α < 1 lower it."
        "\nXing et al.: consecutive gradients point against each other more at larger η; barriers are rarely crossed.\n"
    )
    typer.echo(_headlines(out))
    typer.echo(f"\nreport: {report.resolve()}")
    return report
