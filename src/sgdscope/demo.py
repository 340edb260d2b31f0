"""``sgdscope demo``: a short tour of both papers on the embedded digits set."""

from __future__ import annotations

from pathlib import Path

import typer

DEMO_CONFIG = {
    "seed": 0,
    "device": "auto",
    "data": {"name": "digits", "flatten": True},
    "model": {"name": "mlp", "widths": [64, 64]},
    "optimizer": {"name": "sgd", "lr": 0.1, "batch_size": 64},
    "train": {"epochs": 6},
    "measure": {"subset": 0.5, "min_subset": 500},
    "probes": {
        "eigen": {"every": "epoch", "k": 3, "tol": 1e-3},
        "direction": {"every": "epoch", "eigen_indices": [1]},
        "alpha_step": {"every": "epoch", "eigen_indices": [1]},
        "interpolation": {"every": 1, "epochs": [1, 6]},
    },
}


def demo(out: Path) -> Path:
    """Train the demo run into ``out/run`` and print where it is and what it holds."""
    from sgdscope.cli import _summary
    from sgdscope.train import run

    path = run(DEMO_CONFIG, out / "run", resume=(out / "run").exists(), progress=True)
    _summary(path)
    typer.echo(f"demo written to {out}")
    return path
