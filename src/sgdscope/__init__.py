"""sgdscope: watch stochastic gradient descent walk through a neural network's loss landscape."""

__version__ = "0.1.0"


def run(config, out=None, *, resume=False, progress=True):
    """Train one run (see :func:`sgdscope.train.run`) and return its directory."""
    from sgdscope.train import run as _run

    return _run(config, out, resume=resume, progress=progress)


__all__ = ["run", "__version__"]
