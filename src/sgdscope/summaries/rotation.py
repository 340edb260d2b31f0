"""Report rows of the ``rotation`` table: how far the top-K subspace turns between measurements."""

from __future__ import annotations

from sgdscope.summaries import Row
from sgdscope.tables import has


def rows(store) -> list[Row]:
    """Median largest / smallest principal angle to the previous measurement, and the last overlap with
    the reference measurement's subspace."""
    rot = store.table("rotation")
    if not has(rot, "step", "index", "angle_prev_deg"):
        return []
    moved = rot[rot["angle_prev_deg"].notna()]
    if not len(moved):
        return []
    per_step = moved.groupby("step")["angle_prev_deg"]
    k = int(rot["index"].max())
    out: list[Row] = [
        ("rotation", f"median largest angle θ{k} to the previous measurement (°)", float(per_step.max().median()),
         f"over {per_step.ngroups} measurements, top-{k} subspace"),
        ("rotation", "median smallest angle θ1 to the previous measurement (°)", float(per_step.min().median()), ""),
    ]
    if has(rot, "overlap_ref"):
        last = rot[rot["step"] == rot["step"].max()].iloc[0]
        ref = int(last["ref_step"]) if "ref_step" in rot else -1
        out.append(("rotation", "final overlap with the reference subspace", float(last["overlap_ref"]),
                    f"‖V_refᵀV‖²_F/K at step {int(last['step'])}, reference step {ref}"))
    return out
