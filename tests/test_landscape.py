"""Landscape measurements: interpolation, cross-sections, valley profiles, k_min and step-length scans."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgdscope.curvature.flat import get_flat, set_flat
from sgdscope.errors import ConfigError
from sgdscope.landscape import (
    alpha_step_changes,
    interpolate,
    k_min,
    loss_along,
    loss_at_points,
    minibatch_grads,
    random_direction,
    typical_step,
    valley_profile,
)
from sgdscope.landscape.valley import BARRIER_REL_TOL
from sgdscope.losses import cross_entropy, evaluate, forward, functional_forward, n_targets, split_batches, take
from sgdscope.policy import BN_POLICIES, fixed_masks, measurement_mode, norm_buffers

ALPHAS = [i / 10 for i in range(11)]


def _mlp(batchnorm: bool, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(8)] if batchnorm else []
    drop = [nn.Dropout(dropout)] if dropout else []  # after the ReLU, so the layers' indices stay as they were
    model = nn.Sequential(nn.Linear(5, 8), *mid, nn.ReLU(), *drop, nn.Linear(8, 3))
    if batchnorm:  # running statistics that differ from their defaults, so eval mode is a real test
        with torch.no_grad():
            model(torch.randn(64, 5) * 3 + 1)
    return model


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return x, y


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


class Quadratic(nn.Module):
    """A "model" whose output is c + ½θᵀAθ, whatever the input: every landscape quantity has a closed form."""

    def __init__(self, eigenvalues: list[float], c: float = 1.0) -> None:
        super().__init__()
        n = len(eigenvalues)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigenvalues)) @ q.T)
        self.register_buffer("vecs", q.T.contiguous())  # rows: unit eigenvectors
        self.theta = nn.Parameter(torch.zeros(len(eigenvalues)))
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.c + 0.5 * self.theta @ self.a @ self.theta).expand(len(x))


def _mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.mean()


ONE = [(torch.zeros(1, 1), torch.zeros(1))]


# ---------------------------------------------------------------------------------------- interpolate


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("policy", ["train-restore", "eval"])
def test_vmap_agrees_with_loop_and_leaves_no_trace(data, batchnorm, policy):
    x, y = data
    model = _mlp(batchnorm)
    batches = split_batches(x, y, 16)  # 16, 16, 8: uneven on purpose
    theta_a = get_flat(model)
    theta_b = theta_a + 0.3 * torch.randn(theta_a.shape, generator=torch.Generator().manual_seed(2))
    model.train(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before, rng = _state(model), torch.get_rng_state()

    loop = interpolate(model, theta_a, theta_b, ALPHAS, batches, bn_policy=policy, method="loop")
    assert _same(before, _state(model)) and torch.equal(rng, torch.get_rng_state())
    vm = interpolate(model, theta_a, theta_b, ALPHAS, batches, bn_policy=policy, method="vmap")
    assert _same(before, _state(model)) and torch.equal(rng, torch.get_rng_state())
    assert not model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    torch.testing.assert_close(vm, loop, rtol=1e-5, atol=1e-6)

    for theta, value in [(theta_a, loop[0]), (theta_b, loop[-1])]:
        set_flat(model, theta)
        with measurement_mode(model, policy):
            plain, _ = evaluate(model, cross_entropy, batches)
        assert value.item() == pytest.approx(plain, rel=1e-6)
    set_flat(model, theta_a)


def test_end_points_are_the_iterates_exactly(data):
    x, y = data
    model = _mlp(False)
    a = get_flat(model)
    b = a + 1.0
    end_points = interpolate(model, a, b, [0.0, 1.0], [(x, y)], method="loop")
    along = loss_along(model, a, b - a, [0.0], [(x, y)], method="loop")
    assert end_points[0] == along[0]
    set_flat(model, b)
    assert end_points[1] == loss_along(model, b, a, [0.0], [(x, y)], method="loop")[0]


def test_uneven_batches_weight_by_examples(data):
    x, y = data
    model = _mlp(False)
    a, b = get_flat(model), get_flat(model) * 0.5
    whole = interpolate(model, a, b, ALPHAS, [(x, y)])
    parts = interpolate(model, a, b, ALPHAS, [(x[:7], y[:7]), (x[7:], y[7:])])
    torch.testing.assert_close(parts, whole)


def test_weight_decay_adds_the_l2_term(data):
    x, y = data
    model = _mlp(False)
    a, b = get_flat(model), get_flat(model) * -2
    plain = interpolate(model, a, b, ALPHAS, [(x, y)])
    with_l2 = interpolate(model, a, b, ALPHAS, [(x, y)], weight_decay=0.1)
    points = torch.stack([(1 - t) * a + t * b for t in ALPHAS])
    torch.testing.assert_close(with_l2 - plain, 0.1 * (points**2).sum(1))


def test_train_policy_updates_running_stats_in_order_and_vmap_refuses(data):
    x, y = data
    model = _mlp(True)
    a = get_flat(model)
    mean_before = model[1].running_mean.clone()
    interpolate(model, a, a, [0.0, 1.0], [(x, y)], bn_policy="train")  # auto -> loop
    expected, batch_mean = mean_before, model[0](x).mean(0).detach()
    for _ in range(2):  # BN momentum 0.1, one update per evaluated point
        expected = 0.9 * expected + 0.1 * batch_mean
    torch.testing.assert_close(model[1].running_mean, expected)
    with pytest.raises(ConfigError, match="vmap"):
        interpolate(model, a, a, [0.0], [(x, y)], bn_policy="train", method="vmap")
    with pytest.raises(ConfigError, match="method"):
        interpolate(model, a, a, [0.0], [(x, y)], method="fast")


def test_vmap_chunking_matches(data):
    x, y = data
    model = _mlp(True)
    points = get_flat(model) + torch.randn(5, get_flat(model).numel(), generator=torch.Generator().manual_seed(4))
    full = loss_at_points(model, points, [(x, y)], method="vmap")
    torch.testing.assert_close(loss_at_points(model, points, [(x, y)], method="vmap", chunk_size=2), full)


# ------------------------------------------------------ common random numbers: dropout masks (issue 11 §1)

DROPOUT_MODELS = {"dropout": False, "bn+dropout": True}  # kind -> with BatchNorm


def _dropout_model(kind: str) -> nn.Module:
    return _mlp(batchnorm=DROPOUT_MODELS[kind], dropout=0.5)


def _segment(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    a = get_flat(model)
    return a, a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))


def _methods(model: nn.Module, policy: str) -> list[str]:
    # vmap refuses "train" with BN (the running statistics cannot be updated in order)
    return ["loop"] if policy == "train" and norm_buffers(model) else ["loop", "vmap"]


@pytest.mark.parametrize("kind", DROPOUT_MODELS)
@pytest.mark.parametrize("policy", BN_POLICIES)
def test_identical_end_points_give_a_flat_curve(data, kind, policy):
    x, y = data
    model = _dropout_model(kind)
    a = get_flat(model)
    for method in _methods(model, policy):
        curve = interpolate(model, a, a.clone(), ALPHAS, split_batches(x, y, 16), bn_policy=policy, method=method)
        if method == "loop":  # the same computation at every point: the same bits
            assert torch.equal(curve, curve[0].expand_as(curve)), curve
        else:  # vmap's batched BatchNorm reduces each point in its own order: flat up to round-off
            assert float(curve.max() - curve.min()) <= 1e-6 * float(curve[0]), curve
        # ... which the barrier test's default tolerance absorbs
        assert not valley_profile(curve, ALPHAS).barrier


@pytest.mark.parametrize("kind", DROPOUT_MODELS)
@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_reversed_segment_is_the_same_curve(data, kind, method):
    x, y = data
    model = _dropout_model(kind)
    a, b = _segment(model)
    batches = split_batches(x, y, 16)
    there = interpolate(model, a, b, ALPHAS, batches, method=method)
    back = interpolate(model, b, a, ALPHAS, batches, method=method)
    # the points agree up to the rounding of (1-α)θa + αθb against αθa + (1-α)θb
    torch.testing.assert_close(back.flip(0), there, rtol=1e-5, atol=1e-6)
    assert abs(float(there[0] - there[-1])) > 1e-2  # a segment whose ends differ, so the check has teeth


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_the_mask_seed_chooses_the_masks(data, method):
    x, y = data
    model = _dropout_model("dropout")
    a, b = _segment(model)

    def run(seed, policy="train-restore"):
        return interpolate(model, a, b, ALPHAS, [(x, y)], bn_policy=policy, method=method, mask_seed=seed)

    assert torch.equal(run(None), run(0))  # None is the fixed default seed: a function of the parameters
    assert torch.equal(run(1), run(1))
    assert (run(1) - run(2)).abs().max() > 1e-2
    assert torch.equal(run(1, "eval"), run(2, "eval"))  # no dropout in eval mode: the seed plays no part


@pytest.mark.parametrize("kind", DROPOUT_MODELS)
def test_loss_along_is_continuous_at_zero(data, kind):
    x, y = data
    model = _dropout_model(kind)
    theta = get_flat(model)
    d = random_direction(model, torch.Generator().manual_seed(3))
    batches = split_batches(x, y, 16)
    curve = loss_along(model, theta, d, [-1e-5, 0.0, 1e-5], batches)
    # |dL/dk| = |⟨∇L, d⟩| ≤ ‖∇L‖ = O(1) for a unit d: a step of 1e-5 moves the loss by about 1e-5
    assert (curve - curve[1]).abs().max() < 1e-4, curve
    # what fresh masks would do instead: another mask seed at the very same point
    assert abs(float(loss_along(model, theta, d, [0.0], batches, mask_seed=1)[0] - curve[1])) > 1e-2


@pytest.mark.parametrize(
    "kind, policy", [("dropout", "train-restore"), ("dropout", "train"), ("bn+dropout", "train-restore")]
)
def test_vmap_and_loop_share_the_masks(data, kind, policy):
    x, y = data
    model = _dropout_model(kind)
    a, b = _segment(model)
    points = torch.stack([(1 - t) * a + t * b for t in ALPHAS])
    batches = split_batches(x, y, 16)
    kw = dict(bn_policy=policy, mask_seed=5)
    loop = loss_at_points(model, points, batches, method="loop", **kw)
    vm = loss_at_points(model, points, batches, method="vmap", **kw)
    torch.testing.assert_close(vm, loop, rtol=1e-5, atol=1e-6)
    # chunks are seeded afresh: chunking does not change the masks
    torch.testing.assert_close(loss_at_points(model, points, batches, method="vmap", chunk_size=3, **kw), vm)


def _kernels(x, y):
    """Each landscape kernel, as a call on (model, θa, θb, batches, policy)."""
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    return {
        "interpolate-loop": lambda m, a, b, bs, p: interpolate(m, a, b, ALPHAS, bs, bn_policy=p, method="loop"),
        "interpolate-vmap": lambda m, a, b, bs, p: interpolate(m, a, b, ALPHAS, bs, bn_policy=p, method="vmap"),
        "loss_along": lambda m, a, b, bs, p: loss_along(m, a, b - a, [-1.0, 0.0, 2.0], bs, bn_policy=p),
        "minibatch_grads": lambda m, a, b, bs, p: minibatch_grads(m, cross_entropy, x, y, 8, 3, gen(), bn_policy=p),
        "alpha_step_changes": lambda m, a, b, bs, p: alpha_step_changes(
            m, (b - a) / (b - a).norm(), 0.1, torch.randn(3, a.numel(), generator=gen()), [0.5, 1.0], bs, bn_policy=p
        ),
    }


@pytest.mark.parametrize("policy", BN_POLICIES)
@pytest.mark.parametrize("kernel", list(_kernels(None, None)))
def test_kernels_leave_rng_and_batchnorm_as_found(data, policy, kernel):
    x, y = data
    model = _dropout_model("bn+dropout")
    if policy == "train" and kernel == "interpolate-vmap":
        pytest.skip("vmap refuses the train policy with BN")
    a, b = _segment(model)
    call = _kernels(x, y)[kernel]
    stats = {k: v.clone() for k, v in norm_buffers(model).items()}
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    first = call(model, a, b, split_batches(x, y, 16), policy)
    assert torch.equal(torch.get_rng_state(), rng)
    after = torch.randn(6)  # what training draws next
    torch.manual_seed(11)
    assert torch.equal(after, torch.randn(6))  # ... is what it draws with no measurement at all
    if policy != "train":  # "train" updates the running statistics by design (loss evaluations only)
        assert all(torch.equal(v, stats[k]) for k, v in norm_buffers(model).items())
    torch.manual_seed(12)  # another RNG state left by training: the measurement does not see it
    again = call(model, a, b, split_batches(x, y, 16), policy)
    # a deterministic function of the parameters (under "train" too: BN in train mode normalises with the
    # batch statistics, so the running statistics it moved play no part)
    for u, v in zip(first if isinstance(first, tuple) else [first], again if isinstance(again, tuple) else [again]):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------ inputs of any form (issue 10)


class TwoInputs(nn.Module):
    """The MLP behind a two-input signature with a keyword-only flag: forward(a, b) = mlp(cat(a, b))."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, negate: bool = False) -> torch.Tensor:
        out = self.inner(torch.cat([a, b], dim=-1))
        return -out if negate else out


FORMS = {
    "tuple": lambda x: (x[:, :2], x[:, 2:]),
    "list": lambda x: [x[:, :2], x[:, 2:]],
    "dict": lambda x: {"b": x[:, 2:], "a": x[:, :2], "negate": False},
}


def test_forward_take_and_split_follow_the_input_form(data):
    x, y = data
    model = TwoInputs(_mlp(False))
    inner = model.inner
    for form, make in FORMS.items():
        xs = make(x)
        torch.testing.assert_close(forward(model, xs), inner(x), rtol=0, atol=0)
        state = {n: p.detach() * 2 for n, p in model.named_parameters()}
        with torch.no_grad():
            set_flat(inner, get_flat(inner) * 2)
            torch.testing.assert_close(functional_forward(model, state, xs), inner(x), rtol=0, atol=0)
            set_flat(inner, get_flat(inner) / 2)
        idx = torch.tensor([3, 0, 7])
        torch.testing.assert_close(forward(model, take(xs, idx)), inner(x[idx]), rtol=0, atol=0)
        parts = split_batches(xs, y, 16)
        assert [len(p[1]) for p in parts] == [16, 16, 8], form
        assert type(parts[0][0]) is type(xs)
        torch.testing.assert_close(forward(model, parts[2][0]), inner(x[32:]), rtol=0, atol=0)
    assert forward(model, {"a": x[:, :2], "b": x[:, 2:], "negate": True}).neg().equal(inner(x))


@pytest.mark.parametrize("form", FORMS)
def test_kernels_take_inputs_of_any_form(data, form):
    x, y = data
    plain = _mlp(False, dropout=0.5)
    model = TwoInputs(_mlp(False, dropout=0.5))  # the same initialisation, the same dropout layer
    xs = FORMS[form](x)
    a, b = _segment(plain)
    batches, ref = split_batches(xs, y, 16), split_batches(x, y, 16)
    for method in ("loop", "vmap"):
        torch.testing.assert_close(
            interpolate(model, a, b, ALPHAS, batches, method=method), interpolate(plain, a, b, ALPHAS, ref, method=method)
        )
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(
        minibatch_grads(model, cross_entropy, xs, y, 8, 3, gen(), mask_seed=2),
        minibatch_grads(plain, cross_entropy, x, y, 8, 3, gen(), mask_seed=2),
    )
    with measurement_mode(model, "eval"), measurement_mode(plain, "eval"):
        assert evaluate(model, cross_entropy, batches) == evaluate(plain, cross_entropy, ref)


def test_minibatch_masks_are_per_minibatch_and_seeded(data):
    x, y = data
    model = _dropout_model("dropout")
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    g1 = minibatch_grads(model, cross_entropy, x, y, len(x), 2, gen(), mask_seed=1)
    assert torch.equal(g1, minibatch_grads(model, cross_entropy, x, y, len(x), 2, gen(), mask_seed=1))
    # the full batch twice: the gradients differ only by the masks of minibatch 0 and 1
    assert (g1[0] - g1[1]).abs().max() > 1e-3
    g2 = minibatch_grads(model, cross_entropy, x, y, len(x), 2, gen(), mask_seed=2)
    assert (g1 - g2).abs().max() > 1e-3
    # minibatch j's masks are those of fixed_masks(mask_seed, j), on the examples the generator drew
    g = gen()
    idx = [torch.randperm(len(x), generator=g) for _ in range(2)][1]
    with measurement_mode(model, "train-restore"), fixed_masks(1, 1):
        loss = cross_entropy(model(x[idx]), y[idx])
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(g1[1], want)


# ------------------------------------------------------------- weighting by real targets (ignore_index)


class TokenModel(nn.Module):
    """Next-token logits from each token alone: ids (B, T) -> (B, T, V). A token's loss depends on its own
    id only, so padding can change a mean only through the weighting."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, vocab)
        self.drop = nn.Dropout(0.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def lm_batches(lengths: list[list[int]], vocab: int = 5, pad: int = -100, seed: int = 0):
    """Padded batches of sequences with the given real lengths (inputs padded with id 0, targets with
    ``pad``), and the unpadded concatenation of every real token as one batch of shape (1, N)."""
    g = torch.Generator().manual_seed(seed)
    batches, xs, ys = [], [], []
    for group in lengths:
        width = max(max(group), 1)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), pad)
        for i, n in enumerate(group):
            x[i, :n] = torch.randint(0, vocab, (n,), generator=g)
            y[i, :n] = torch.randint(0, vocab, (n,), generator=g)
            xs.append(x[i, :n])
            ys.append(y[i, :n])
        batches.append((x, y))
    return batches, (torch.cat(xs)[None], torch.cat(ys)[None])


LENGTHS = [[5, 2, 4], [1, 3], [0, 0]]  # uneven padding, and a batch that is all padding


def test_n_targets_counts_real_targets():
    y = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    assert n_targets(y) == 6 and n_targets(y, ignore_index=-100) == 2 and n_targets(y, ignore_index=2) == 5


def test_padded_batches_weigh_as_the_unpadded_concatenation():
    model = TokenModel()
    batches, whole = lm_batches(LENGTHS)
    a, b = _segment(model)
    padded = interpolate(model, a, b, ALPHAS, batches, ignore_index=-100)
    torch.testing.assert_close(padded, interpolate(model, a, b, ALPHAS, [whole]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        loss_along(model, a, b - a, [0.0, 1.0], batches, ignore_index=-100, method="vmap"), padded[[0, -1]]
    )
    # counting the padding (no ignore_index) weighs the batches wrongly, and the all-padding batch's mean
    # (0/0) poisons the sum
    assert torch.isnan(interpolate(model, a, b, ALPHAS, batches)).all()
    without_empty = interpolate(model, a, b, ALPHAS, batches[:2])
    assert (without_empty - padded).abs().max() > 1e-3
    with measurement_mode(model, "eval"):
        loss, acc = evaluate(model, cross_entropy, batches, ignore_index=-100)
        want_loss, want_acc = evaluate(model, cross_entropy, [whole])
    assert loss == pytest.approx(want_loss, rel=1e-6) and acc == pytest.approx(want_acc, abs=1e-12)
    with pytest.raises(ValueError, match="hold no target"):
        interpolate(model, a, b, ALPHAS, batches[2:], ignore_index=-100)


def test_minibatch_without_real_targets_is_refused():
    model = TokenModel()
    [(x, y)], _ = lm_batches([[0, 0]])
    with pytest.raises(ValueError, match="ignore_index"):
        minibatch_grads(model, cross_entropy, x, y, 2, 1, torch.Generator(), ignore_index=-100)


# ------------------------------------------------------------------ quadratic: closed-form cross-sections


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_loss_along_an_eigenvector_of_a_quadratic(method):
    lam = [4.0, 1.0, 0.25]
    model = Quadratic(lam)
    theta = torch.tensor([0.5, -1.0, 2.0])
    grad = model.a @ theta
    base = 1.0 + 0.5 * theta @ model.a @ theta
    ks = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    for e, l in zip(model.vecs, lam):
        curve = loss_along(model, theta, e, ks, ONE, loss_fn=_mean, method=method)
        torch.testing.assert_close(curve - base, ks * (grad @ e) + 0.5 * l * ks**2)
    assert torch.equal(model.theta.detach(), torch.zeros(3))


def test_k_min_on_a_quadratic_bowl():
    # at the bottom, L(k·e) = 1 + ½·2·k² = 1 + k²: 1% above needs |k| ≥ 0.1, 10% needs |k| ≥ 0.316
    model = Quadratic([2.0, 0.5])
    ks = [0, 0.25, -0.25, 0.5, -0.5, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16]
    curve = loss_along(model, torch.zeros(2), model.vecs[0], ks, ONE, loss_fn=_mean)
    assert k_min(ks, curve, 1.0, 0.01) == 0.25
    assert k_min(ks, curve, 1.0, 0.1) == 0.5
    # along the flat direction L = 1 + k²/4: 10% needs |k| ≥ 0.632
    flat = loss_along(model, torch.zeros(2), model.vecs[1], ks, ONE, loss_fn=_mean)
    assert k_min(ks, flat, 1.0, 0.1) == 1.0
    assert math.isnan(k_min(ks, flat, 1.0, 1000.0))


def test_k_min_needs_both_sides():
    ks = [-1, 1, 2, -2, 0.5]
    assert math.isnan(k_min(ks, [1.0, 3.0, 4.0, 1.0, 2.0], 1.0, 0.1))  # the negative side never rises
    assert k_min(ks, [1.0, 3.0, 4.0, 1.2, 2.0], 1.0, 0.1) == 0.5
    assert k_min(ks, [float("inf"), 1.0, float("inf"), 1.0, 1.0], 1.0, 0.1) == 2.0
    assert math.isnan(k_min(ks, [float("nan"), 3.0, 4.0, float("nan"), 1.0], 1.0, 0.1))
    with pytest.raises(ValueError):
        k_min([1, -1], [1.0], 1.0, 0.1)


def test_typical_step_and_alpha_steps_on_a_quadratic():
    lam = [3.0, 1.0]
    model = Quadratic(lam)
    theta = torch.tensor([1.0, -0.5])
    set_flat(model, theta)
    e = model.vecs[0]
    grads = torch.stack([model.a @ theta + d for d in (torch.tensor([0.2, 0.0]), torch.tensor([-0.4, 0.3]))])
    lr, alphas = 0.1, [0.5, 1.0, 2.0]
    proj = grads @ e
    assert typical_step(model, e, lr, grads) == pytest.approx(lr * proj.abs().mean().item())

    change, rel = alpha_step_changes(model, e, lr, grads, alphas, ONE, loss_fn=_mean)
    base = 1.0 + 0.5 * theta @ model.a @ theta
    slope = (model.a @ theta) @ e
    for i, a in enumerate(alphas):
        t = -a * lr * proj  # L(θ + t·e) − L(θ) = t·⟨∇L, e⟩ + ½λt², averaged over the gradients
        expected = (t * slope + 0.5 * lam[0] * t**2).mean()
        torch.testing.assert_close(change[i], expected)
        torch.testing.assert_close(rel[i], expected / base)
    assert torch.equal(get_flat(model), theta)


def test_typical_step_checks_shapes():
    with pytest.raises(ValueError):
        typical_step(Quadratic([1.0, 2.0]), torch.ones(3), 0.1, torch.ones(2, 3))


# ------------------------------------------------------------------------ minibatch gradients, directions


def test_minibatch_grads_is_isolated_and_reproducible(data):
    x, y = data
    model = _mlp(True)
    model.eval()
    before, rng = _state(model), torch.get_rng_state()
    g1 = minibatch_grads(model, cross_entropy, x, y, 8, 4, torch.Generator().manual_seed(5), weight_decay=0.01)
    assert g1.shape == (4, get_flat(model).numel())
    assert _same(before, _state(model)) and torch.equal(rng, torch.get_rng_state()) and not model.training
    assert all(p.grad is None for p in model.parameters())
    g2 = minibatch_grads(model, cross_entropy, x, y, 8, 4, torch.Generator().manual_seed(5), weight_decay=0.01)
    assert torch.equal(g1, g2)
    assert not torch.equal(g1[0], g1[1])


def test_full_size_minibatch_is_the_full_gradient(data):
    x, y = data
    model = _mlp(False)
    grads = minibatch_grads(model, cross_entropy, x, y, len(x), 2, torch.Generator().manual_seed(0), weight_decay=0.1)
    loss = cross_entropy(model(x), y) + 0.1 * sum((p**2).sum() for p in model.parameters())
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(grads, full.expand(2, -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError):
        minibatch_grads(model, cross_entropy, x, y, len(x) + 1, 1, torch.Generator())


def test_random_direction_is_a_seeded_unit_vector():
    model = _mlp(False)
    rng = torch.get_rng_state()
    d = random_direction(model, torch.Generator().manual_seed(9))
    assert torch.equal(rng, torch.get_rng_state())
    assert d.shape == get_flat(model).shape and d.norm().item() == pytest.approx(1.0)
    assert torch.equal(d, random_direction(model, torch.Generator().manual_seed(9)))


# -------------------------------------------------------------------------------------- valley profiles


def test_flat_curve():
    p = valley_profile([1.0] * 5, [0, 0.25, 0.5, 0.75, 1])
    assert (p.floor, p.argmin_alpha, p.interior_min, p.height, p.barrier, p.barrier_height) == (
        1.0, 0.0, False, 0.0, False, 0.0,
    )


def test_monotone_curves():
    alphas = [0, 0.5, 1]
    up = valley_profile([1.0, 2.0, 3.0], alphas)
    assert (up.floor, up.argmin_alpha, up.interior_min, up.height, up.barrier) == (1.0, 0.0, False, 0.0, False)
    down = valley_profile([3.0, 2.0, 1.0], alphas)
    assert (down.floor, down.argmin_alpha, down.height, down.barrier) == (1.0, 1.0, 2.0, False)
    assert valley_profile([3.0, 2.0, 1.0], alphas, height="end").height == 0.0
    assert valley_profile([3.0, 2.0, 1.0], alphas, height="mean").height == 1.0


def test_interior_minimum_from_a_tensor():
    p = valley_profile(torch.tensor([2.0, 0.5, 1.0, 1.5]), torch.tensor([0.0, 0.3, 0.6, 1.0]))
    assert (p.floor, p.argmin_alpha, p.interior_min, p.height, p.left_loss, p.right_loss) == (
        0.5, pytest.approx(0.3), True, 1.5, 2.0, 1.5,
    )
    assert not p.barrier


def test_barrier_and_single_point_spike():
    p = valley_profile([1.0, 1.2, 1.6, 1.1, 0.9], [0, 0.25, 0.5, 0.75, 1])
    assert p.barrier and p.barrier_height == pytest.approx(0.6) and p.argmin_alpha == 1.0
    spike = valley_profile([1.0, 0.8, 5.0, 0.7, 1.0], [0, 0.25, 0.5, 0.75, 1])
    assert spike.barrier and spike.barrier_height == 4.0 and spike.interior_min and spike.floor == 0.7


def test_ties_are_no_barrier_and_no_interior_minimum():
    assert not valley_profile([1.0, 2.0, 2.0], [0, 0.5, 1]).barrier  # interior ties the higher end
    tie_low = valley_profile([2.0, 1.0, 1.0], [0, 0.5, 1])
    assert (tie_low.argmin_alpha, tie_low.interior_min) == (1.0, False)


def test_unsorted_alphas_and_tolerances():
    p = valley_profile([1.05, 1.0, 1.0], [0.5, 1.0, 0.0])
    assert p.barrier and p.barrier_height == pytest.approx(0.05)
    assert not valley_profile([1.05, 1.0, 1.0], [0.5, 1.0, 0.0], abs_tol=0.1).barrier
    assert not valley_profile([1.05, 1.0, 1.0], [0.5, 1.0, 0.0], rel_tol=0.06).barrier
    assert valley_profile([1.05, 1.0, 1.0], [0.5, 1.0, 0.0], rel_tol=0.04).barrier


def test_default_tolerance_ignores_round_off():
    assert BARRIER_REL_TOL == 1e-6
    for m in (2.0, -2.0):  # the tolerance is relative to |m|
        bump = m + abs(m) * 1e-9  # round-off-sized rise above both ends
        p = valley_profile([m, bump, m], [0, 0.5, 1])
        assert not p.barrier and p.barrier_height == 0.0
        assert valley_profile([m, bump, m], [0, 0.5, 1], rel_tol=0.0).barrier  # the paper's strict test
        real = valley_profile([m, m + abs(m) * 1e-5, m], [0, 0.5, 1])
        assert real.barrier and real.barrier_height == pytest.approx(abs(m) * 1e-5)


def test_nan_handling():
    nan, inf = float("nan"), float("inf")
    interior = valley_profile([1.0, nan, 0.5, 1.0], [0, 0.3, 0.6, 1])  # NaN interior point is skipped
    assert (interior.floor, interior.argmin_alpha, interior.barrier) == (0.5, 0.6, False)
    end = valley_profile([nan, 2.0, 0.5], [0, 0.5, 1])
    assert end.floor == 0.5 and math.isnan(end.height) and not end.barrier and math.isnan(end.barrier_height)
    assert valley_profile([nan, 2.0, 0.5], [0, 0.5, 1], height="end").height == 0.0
    blown = valley_profile([1.0, inf, 1.0], [0, 0.5, 1])
    assert blown.barrier and blown.barrier_height == inf
    allnan = valley_profile([nan, nan], [0, 1])
    assert math.isnan(allnan.floor) and not allnan.interior_min and not allnan.barrier


def test_valley_input_errors():
    with pytest.raises(ConfigError, match="end points"):
        valley_profile([1.0, 2.0], [0.0, 0.9])
    with pytest.raises(ConfigError, match="0, 1"):
        valley_profile([1.0, 2.0, 3.0], [0.0, 1.0, 1.5])
    with pytest.raises(ConfigError, match="losses"):
        valley_profile([1.0], [0.0, 1.0])
    with pytest.raises(ConfigError, match="height"):
        valley_profile([1.0, 1.0], [0.0, 1.0], height="max")
