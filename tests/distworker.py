"""One rank of the 2-process gloo checks of tests/test_distributed.py, launched as torchrun would launch it
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment): ``python tests/distworker.py OUT_DIR``.

Every rank computes the sharded kernels and, as its oracle, the one-process kernels on the whole batch
list; rank 0 also runs the same user loop (plain SGD on a DDP-wrapped model, Scope measuring) once over
the group and once on its own. Each rank saves what it found to OUT_DIR/rank{r}.pt; the test compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from conftest import F64, build_case  # noqa: E402

from sgdscope import Scope, distributed  # noqa: E402
from sgdscope.curvature import HessianOperator, top_eigenpairs  # noqa: E402
from sgdscope.curvature.flat import get_flat  # noqa: E402
from sgdscope.landscape import loss_at_points, minibatch_grads  # noqa: E402

WD = 0.05
PROBES = {
    "eigen": {"every": 2, "k": 3, "tol": 1e-6, "max_hvps": 60},
    "direction": {"every": 2, "eigen_indices": [1, 2], "n_grads": 3, "ks": [-1, 1]},
    "alpha_step": {"every": 2, "eigen_indices": [1], "n_grads": 3, "alphas": [0.5, 1.0]},
    "alignment": {"every": 2},
    "interpolation": {"every": 1, "alphas": 4},
}


def kernels(case_id: str) -> dict:
    """Sharded against one-process products, gradient, losses and minibatch gradients of one case."""
    case = build_case(case_id)
    model, batches = case.model, case.batches
    sh = distributed.shard(batches)
    kw = dict(bn_policy="train-restore", weight_decay=WD, mask_seed=11)
    one = HessianOperator(model, case.loss_fn, batches, **kw)
    par = distributed.hessian_operator(model, case.loss_fn, sh, **kw)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(4, one.n_params, generator=g, dtype=F64)
    points = get_flat(model) + 0.3 * torch.randn(3, one.n_params, generator=g, dtype=F64)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = {
        "matvec": (par.matvec(V[0]), one.matvec(V[0])),
        "matmat": (par.matmat(V), one.matmat(V)),
        "gradient": (par.gradient(), one.gradient()),
        "losses": (loss_at_points(model, points, sh, case.loss_fn, **kw), loss_at_points(model, points, batches, case.loss_fn, **kw)),
        "grads": tuple(
            draw(model, case.loss_fn, x, y, 4, 5, torch.Generator().manual_seed(5), weight_decay=WD, mask_seed=2)
            for draw in (lambda *a, **k: distributed.minibatch_grads(sh, *a, **k), minibatch_grads)
        ),
        "n_hvps": (par.n_hvps, one.n_hvps),
    }
    e_par = top_eigenpairs(par, k=3, tol=1e-8, max_hvps=45, generator=torch.Generator().manual_seed(0))
    e_one = top_eigenpairs(one, k=3, tol=1e-8, max_hvps=45, generator=torch.Generator().manual_seed(0))
    out["eig_values"], out["eig_vectors"] = (e_par.values, e_one.values), (e_par.vectors, e_one.vectors)
    if case_id == "mlp":  # a second oracle: the dense Hessian of the weighted loss by autograd
        out["dense"] = (par.dense(), dense_hessian(case))
    return out


def dense_hessian(case) -> torch.Tensor:
    names = [n for n, _ in case.trainable()]
    shapes = [p.shape for _, p in case.trainable()]
    sizes = [p.numel() for _, p in case.trainable()]
    theta = get_flat(case.model)
    n_all = sum(len(y) for _, y in case.batches)

    def loss(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        total = sum(len(yb) * case.loss_fn(torch.func.functional_call(case.model, params, (xb,)), yb)
                    for xb, yb in case.batches) / n_all
        return total + WD * (flat * flat).sum()

    return torch.autograd.functional.hessian(loss, theta)


def user_loop(group_on: bool, out=None) -> dict:
    """A researcher's loop: DDP-wrapped SGD on this rank's half of each minibatch, the Scope measuring."""
    case = build_case("mlp")
    model, loss_fn = case.model, case.loss_fn
    r, w = (distributed.rank(), distributed.world_size()) if group_on else (0, 1)
    net = DistributedDataParallel(model) if group_on else model
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    data = case.batches
    scope = Scope(model, loss_fn, data, probes=PROBES, batch_size=4, weight_decay=WD, seed=1, steps_per_epoch=3,
                  process_group=None if group_on else False, out=out)
    for t in range(4):
        xb, yb = data[t % 2]  # batches of 5 and 3... cut to an even 2 so the DDP mean is the global mean
        xb, yb = xb[:2], yb[:2]
        with scope.step(opt) as rec:
            opt.zero_grad()
            # DDP averages the ranks' gradients: each adds the whole L2 term, so the mean carries it once
            loss = loss_fn(net(xb[r::w]), yb[r::w]) + WD * sum((p * p).sum() for p in model.parameters())
            loss.backward()
            opt.step()
            rec.record(batch_loss=float(loss.detach()))
    tables = {name: scope.table(name) for name in ("eigen", "direction", "k_min", "alpha_step", "alignment", "interpolation", "valley")}
    eig = scope.eigenpairs(3)
    scope.close()
    return {"tables": tables, "theta": get_flat(model), "eig_vectors": eig.vectors, "eig_values": eig.values}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=distributed.timeout())
    res = {cid: kernels(cid) for cid in ("mlp", "dropout", "cnn_bn")}
    res["loop"] = user_loop(True, out_dir / "scope")  # the same directory on both ranks: rank 0 writes it
    res["scope_dir"] = str(out_dir / "scope")
    if distributed.rank() == 0:
        res["loop_one"] = user_loop(False)
    torch.save(res, out_dir / f"rank{distributed.rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
