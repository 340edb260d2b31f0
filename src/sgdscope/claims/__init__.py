"""Verdicts on the papers' claims, one function per bundled experiment (recipe), read from run stores.

Each function takes the runs of one recipe — a sweep directory (``sgdscope sweep``), a single run
directory, a list of ``(overrides, run_dir)`` pairs or a mapping ``{label: run_dir}`` — and returns a
:class:`ClaimResult`: the numbers that test the claim (a DataFrame, one row per run or per grid value),
the individual checks, and the verdict. A run's settings are read from its own resolved ``config.yaml``,
so the overrides only label it.

The numbers reuse :mod:`sgdscope.tables` (peak λ₁, Table 1, barrier and height tables, cosine, distance);
the thresholds that turn them into a verdict are stated in each function's docstring. Checks listed in
``ClaimResult.soft`` are reported but do not decide the verdict (parts of a claim that DEFINITIONS.md
records as not reproducing at toy scale, or secondary observations).

>>> # r = sharpest_lr_sweep("/tmp/recipes/sharpest-lr-sweep-cpu"); print(r.verdict); print(r.numbers)
"""

from __future__ import annotations

from typing import Any, Callable

from sgdscope.claims._common import ClaimResult, load_runs
from sgdscope.claims.jastrzebski import (
    bowl_alpha_step,
    nsgd_table1,
    sharpest_batch_sweep,
    sharpest_lr_sweep,
    subspace_gamma,
    subspace_variants,
)
from sgdscope.claims.operators import ggn_fisher, loss_slice
from sgdscope.claims.noise_sharpness import adaptive_sharpness, batch_sharpness_claim, gradient_noise_claim
from sgdscope.claims.xing import (
    barriers_per_epoch_claim,
    cosine_vs_batch_and_lr,
    isotropic_noise,
    lr_schedules,
    valley_height_vs_lr,
    walk_gd_vs_sgd,
)
from sgdscope.claims.walk_geometry import walk_geometry
from sgdscope.errors import ConfigError
from sgdscope.tables import Runs

# ------------------------------------------------------------------------------------------ registry

CLAIMS: dict[str, Callable[..., ClaimResult]] = {
    "sharpest-lr-sweep": sharpest_lr_sweep,
    "sharpest-batch-sweep": sharpest_batch_sweep,
    "bowl-alpha-step": bowl_alpha_step,
    "subspace-variants": subspace_variants,
    "subspace-gamma": subspace_gamma,
    "nsgd-table1": nsgd_table1,
    "walk-gd-vs-sgd": walk_gd_vs_sgd,
    "valley-height-vs-lr": valley_height_vs_lr,
    "barriers-per-epoch": barriers_per_epoch_claim,
    "cosine-vs-batch-and-lr": cosine_vs_batch_and_lr,
    "isotropic-noise": isotropic_noise,
    "lr-schedules": lr_schedules,
    "ggn-fisher": ggn_fisher,
    "loss-slice": loss_slice,
    "gradient-noise": gradient_noise_claim,
    "adaptive-sharpness": adaptive_sharpness,
    "batch-sharpness": batch_sharpness_claim,
    "walk-geometry": walk_geometry,
}


def experiment_of(recipe: str) -> str:
    """``sharpest-lr-sweep-cpu`` → ``sharpest-lr-sweep``."""
    for suffix in ("-cpu", "-paper"):
        if recipe.endswith(suffix):
            return recipe[: -len(suffix)]
    return recipe


def check(recipe: str, runs: Runs, **kw: Any) -> ClaimResult:
    """The claim of ``recipe`` (a bundled recipe or experiment name) tested on ``runs``."""
    name = experiment_of(recipe)
    if name not in CLAIMS:
        raise ConfigError(f"claims: no claim for {recipe!r}; known: {', '.join(CLAIMS)}")
    return CLAIMS[name](runs, **kw)


__all__ = ["CLAIMS", "ClaimResult", "check", "experiment_of", "load_runs", *(f.__name__ for f in CLAIMS.values())]
