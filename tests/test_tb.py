"""TensorBoard: the live row sink and the mirror of stored runs, read back with TensorBoard's own reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")

from sgdscope.store import RunStore  # noqa: E402
from sgdscope.tb import METADATA, TensorBoardSink, mirror_to_tensorboard  # noqa: E402


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event TensorBoard shows under ``log_dir``: tag -> [(step, value)] by step (a step
    written twice shows twice). TensorBoard reads a folder's files in name order, which within one
    second need not be the order they were written in, so the events are sorted here."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def commit(step: int) -> dict[str, list[dict]]:
    """The rows one step of a Scope with eigen, alpha_step and interpolation would commit."""
    eigen = [
        {"step": step, "epoch": 0, "index": i, "value": 10.0 / i + step, "residual": 1e-4 * i, "n_hvps": 40,
         "converged": 1, "which": "LA", "subset_size": 1000, "bn_policy": "train-restore", "includes_l2": 0,
         "logged_at": step}
        for i in (1, 2)
    ]
    alpha = [
        {"step": step, "epoch": 0, "eigen_index": i, "direction": f"e{i}" if i else "random", "alpha": a,
         "loss_change": 0.1 * a + step, "relative_change": 0.01 * a * (i + 1), "logged_at": step}
        for i in (0, 1) for a in (0.5, 2.0)
    ]
    interp = [{"step": step, "epoch": 0, "alpha": a, "loss": 2.0 - a + step, "logged_at": step} for a in (0.0, 0.5, 1.0)]
    curv = [{"step": step, "epoch": 0, "frobenius_topk": 11.0 + step, "lambda_max": 10.0 + step, "k": 2, "logged_at": step}]
    return {"eigen": eigen, "alpha_step": alpha, "interpolation": interp, "curvature": curv}


def expected(commits: list[dict[str, list[dict]]]) -> dict[str, list[tuple[int, float]]]:
    """The scalars the rows should give, spelled out independently of the code's tag builder."""
    out: dict[str, list[tuple[int, float]]] = {}

    def add(tag, step, v):
        out.setdefault(tag, []).append((step, pytest.approx(v, rel=1e-6)))

    for c in commits:
        for r in c["eigen"]:
            add(f"eigen/value/index={r['index']}", r["step"], r["value"])
            add(f"eigen/residual/index={r['index']}", r["step"], r["residual"])
        for r in c["alpha_step"]:
            a = "0.5" if r["alpha"] == 0.5 else "2"
            for col in ("loss_change", "relative_change"):
                add(f"alpha_step/{col}/direction={r['direction']},alpha={a}", r["step"], r[col])
        for r in c["interpolation"]:
            add(f"interpolation/loss/alpha={r['alpha']:g}", r["step"], r["loss"])
        for r in c["curvature"]:
            add("curvature/frobenius_topk", r["step"], r["frobenius_topk"])
            add("curvature/lambda_max", r["step"], r["lambda_max"])
    return out


def test_sink_writes_each_rows_measured_quantities_at_its_step(tmp_path):
    commits = [commit(s) for s in (0, 5, 10)]
    sink = TensorBoardSink(tmp_path / "tb")
    for c in commits:
        sink.append_many(c)
    sink.close()
    got = scalars(tmp_path / "tb")
    assert got == expected(commits)
    assert sink.tags_written == sorted(got)


def test_metadata_is_never_a_scalar(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.append_many(commit(3))
    sink.close()
    cols = {tag.split("/")[1] for tag in scalars(tmp_path)}
    assert cols == {"value", "residual", "loss_change", "relative_change", "loss", "frobenius_topk", "lambda_max"}
    assert not cols & METADATA
    # the metadata columns of these rows are all in the documented list, so none slipped through by luck
    assert {"subset_size", "converged", "n_hvps", "which", "bn_policy", "includes_l2", "k", "epoch", "logged_at"} <= METADATA


def test_sink_takes_tensors_and_skips_what_has_no_scalar(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.append_many({
        "train": [{"step": torch.tensor(4), "batch_loss": torch.tensor(0.25), "grad_cosine_prev": math.nan,
                   "lr": 0.1, "note": "text"}],
        "epoch": [{"epoch": 1, "val_acc": 0.5, "logged_at": 9}],  # no step column: placed at its commit
        "own": [{"val_acc": 0.75}],  # neither step nor logged_at: nowhere to put it
    })
    sink.close()
    assert scalars(tmp_path) == {"train/batch_loss": [(4, 0.25)], "train/lr": [(4, pytest.approx(0.1))],
                                 "epoch/val_acc": [(9, 0.5)]}


def test_sink_without_rows_leaves_no_event_file(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.append_many({"eigen": []})
    sink.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def train_rows(steps, offset=0.0):
    return [{"train": [{"step": s, "batch_loss": offset + s, "logged_at": s}]} for s in steps]


@pytest.mark.parametrize("same_sink", [True, False], ids=["same-process", "new-process"])
def test_a_resume_hides_the_steps_it_recomputes(tmp_path, monkeypatch, same_sink):
    first = TensorBoardSink(tmp_path)
    for c in train_rows(range(6)):
        first.append_many(c)
    again = first
    if not same_sink:
        first.close()
        # a resumed process starts later, so its event file's name sorts after the first one's
        import tensorboard.summary.writer.event_file_writer as efw

        later = efw.time.time() + 100
        monkeypatch.setattr(efw.time, "time", lambda: later)
        again = TensorBoardSink(tmp_path)
    again.truncate_after(2)  # what a Scope does on restoring a checkpoint of step 2
    for c in train_rows(range(3, 8), offset=10.0):
        again.append_many(c)
    again.close()
    assert scalars(tmp_path)["train/batch_loss"] == [(s, float(s)) for s in range(3)] + [(s, 10.0 + s) for s in range(3, 8)]


# ------------------------------------------------------------------------------------------- the mirror


def stored_run(path: Path, steps) -> RunStore:
    store = RunStore.create(path, {"seed": 0})
    for s in steps:
        store.append_many(commit(s))
    return store


def test_mirror_gives_what_the_live_sink_gives(tmp_path):
    steps = (0, 5, 10)
    stored_run(tmp_path / "run", steps).close()
    tb = mirror_to_tensorboard(tmp_path / "run")
    assert tb == tmp_path / "run" / "tb"
    live = TensorBoardSink(tmp_path / "live")
    for s in steps:
        live.append_many(commit(s))
    live.close()
    assert scalars(tb) == scalars(tmp_path / "live") == expected([commit(s) for s in steps])


def test_mirror_writes_each_row_once_and_reads_only_new_rows(tmp_path, monkeypatch):
    seen: list[int] = []  # how many rows each call hands to the sink, over all tables
    append = TensorBoardSink.append_many
    monkeypatch.setattr(TensorBoardSink, "append_many", lambda self, t: (seen.append(sum(map(len, t.values()))), append(self, t))[1])
    per_commit = sum(map(len, commit(0).values()))

    store = stored_run(tmp_path / "run", (0, 1))  # open, as a running writer's store is
    tb = mirror_to_tensorboard(store.path)
    assert sum(seen) == 2 * per_commit
    seen.clear()
    assert mirror_to_tensorboard(store.path) == tb and sum(seen) == 0  # nothing new: nothing read or written
    for s in (2, 3):
        store.append_many(commit(s))
    mirror_to_tensorboard(store.path)
    assert sum(seen) == 2 * per_commit
    store.close()
    assert scalars(tb) == expected([commit(s) for s in range(4)])  # each (tag, step) exactly once


def test_mirror_is_rebuilt_when_a_resume_dropped_mirrored_rows(tmp_path):
    store = stored_run(tmp_path / "run", range(6))
    tb = mirror_to_tensorboard(store.path)
    store.truncate_after(2)  # a resume from the checkpoint at step 2, before it recomputed anything
    mirror_to_tensorboard(store.path)
    assert scalars(tb) == expected([commit(s) for s in range(3)])
    for s in range(3, 5):  # recomputed rows differ from the lost ones here, so staleness would show
        store.append_many({k: [{**r, "logged_at": s} for r in rows] for k, rows in commit(s + 100).items()})
    mirror_to_tensorboard(store.path)
    store.close()
    got = scalars(tb)
    want = expected([commit(s) for s in range(3)] + [commit(s + 100) for s in range(3, 5)])
    assert got == want


def test_mirror_of_a_run_with_no_rows_yet(tmp_path):
    store = RunStore.create(tmp_path / "run", {"seed": 0})
    assert mirror_to_tensorboard(store.path) == store.path / "tb"
    assert not list((store.path / "tb").glob("events.out.tfevents.*"))


def test_mirror_refuses_a_folder_a_live_sink_wrote(tmp_path):
    from sgdscope.errors import ConfigError

    store = stored_run(tmp_path / "run", (0,))
    live = TensorBoardSink(store.path / "tb")  # what `sgdscope run --tensorboard` gives a run
    live.append_many(commit(0))
    live.close()
    with pytest.raises(ConfigError, match="twice"):
        mirror_to_tensorboard(store.path)
    assert scalars(store.path / "tb") == expected([commit(0)])  # left as it was


def test_a_scope_feeds_the_sink_the_rows_it_commits(tmp_path):
    from torch import nn

    from sgdscope import Scope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    mse = nn.functional.mse_loss
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = Scope(model, mse, (x, y), probes={"eigen": {"every": 2, "k": 2}, "interpolation": {"every": 1, "alphas": 3}},
                  sinks=[TensorBoardSink(tmp_path)])
    for _ in range(4):
        with scope.step(opt):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
    scope.close()
    got = scalars(tmp_path)
    eigen = scope.table("eigen")
    for i in (1, 2):
        rows = eigen[eigen["index"] == i]
        assert got[f"eigen/value/index={i}"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(rows["step"], rows["value"])]
    interp = scope.table("interpolation")
    end = interp[interp["alpha"] == 1.0]
    assert got["interpolation/loss/alpha=1"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(end["step"], end["loss"])]
    assert [s for s, _ in got["train/lr"]] == [1, 2, 3, 4]
    assert not {tag.split("/")[1] for tag in got} & METADATA
