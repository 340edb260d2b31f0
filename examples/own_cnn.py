"""Measure your own CNN in your own training loop.

A small CNN with BatchNorm and dropout, defined right here, learns scikit-learn's 8x8 digits with Adam in
an ordinary PyTorch loop. A Scope around each optimizer step follows the trajectory: the top Hessian
eigenvalues, the loss along the sharpest direction, steps scaled along it, and the loss on the straight
line between consecutive iterates. Then the HTML report of the run directory.

    python examples/own_cnn.py --out runs/own_cnn          # a few minutes on 2 CPU cores
    python examples/own_cnn.py --small --out /tmp/own_cnn  # seconds: what CI runs
"""

import math

import torch
from sklearn.datasets import load_digits
from torch import nn

from sgdscope import Scope

from common import command_line, summarize  # examples/common.py: the command line and the closing summary

# -----------------------------------------------------------------------------
# config: --steps, --out, --small (see common.py)
args = command_line(__doc__, "own_cnn", steps=600, small_steps=12)
small = args.small
steps = args.steps
batch_size = 64
learning_rate = 1e-3
measure_size = 128 if small else 1000  # the fixed subset every measurement uses
every = 4 if small else 50  # steps between curvature measurements
seed = 0
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# data: 1,797 digits as (1, 8, 8) images in [0, 1]; a tenth each held out for validation and test
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target, dtype=torch.long)
val, test, train = torch.randperm(len(y)).split([len(y) // 10, len(y) // 10, len(y) - 2 * (len(y) // 10)])
x_val, y_val, x_test, y_test, x_train, y_train = x[val], y[val], x[test], y[test], x[train], y[train]
steps_per_epoch = len(y_train) // batch_size
measure_data = (x_train[:measure_size], y_train[:measure_size])


# -----------------------------------------------------------------------------
# model: nothing sgdscope knows about
class CNN(nn.Module):
    def __init__(self, width: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


model = CNN()
loss_fn = nn.CrossEntropyLoss()  # the mean over the batch, as the Scope expects
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

# -----------------------------------------------------------------------------
# the Scope: which measurements, how often; rows go to the run directory `out`
scope = Scope(
    model, loss_fn, measure_data, out=args.out, seed=seed, batch_size=batch_size,  # batch_size: of the drawn gradients
    probes={
        "eigen": {"every": every, "k": 2 if small else 5},  # top Hessian eigenpairs, warm-started
        "direction": {"every": every, "eigen_indices": [1], "n_grads": 2 if small else 10},  # loss along e1
        "alpha_step": {"every": every, "eigen_indices": [1], "n_grads": 2 if small else 10},  # θ − αη·g along e1
        "interpolation": {"every": 1, "epochs": [1, math.ceil(steps / steps_per_epoch)], "alphas": 5 if small else 10},
    },
)


@torch.no_grad()
def evaluate(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Loss and accuracy (eval mode: running BN statistics, no dropout)."""
    model.eval()
    logits = model(images)
    model.train()
    return loss_fn(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


# -----------------------------------------------------------------------------
# training loop: an ordinary one, with each step inside `scope.step`
model.train()
for step in range(steps):
    if step % steps_per_epoch == 0:  # a new epoch: a new order of the training digits
        perm = torch.randperm(len(y_train))
    idx = perm[(step % steps_per_epoch) * batch_size:][:batch_size]
    xb, yb = x_train[idx], y_train[idx]

    with scope.step(optimizer) as rec:  # reads θ_t here; the gradient, θ_t+1 and the lr on the way out
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = loss_fn(logits, yb)
        loss.backward()
        optimizer.step()
        rec.record(batch_loss=loss.item(), batch_acc=(logits.argmax(1) == yb).float().mean().item())

    if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:  # an epoch's end (the last may be short)
        (train_loss, train_acc), (val_loss, val_acc), (test_loss, test_acc) = (
            evaluate(x_train, y_train), evaluate(x_val, y_val), evaluate(x_test, y_test))
        # the epoch table's row (what the report's accuracy figures read); every-epoch probes run now
        scope.end_epoch(train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                        test_loss=test_loss, test_acc=test_acc)
        print(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val acc {val_acc:.3f}")

scope.close()

# -----------------------------------------------------------------------------
# what was measured, and the report
summarize(scope)
