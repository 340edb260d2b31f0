"""sgdscope: watch stochastic gradient descent walk through a neural network's loss landscape."""

__version__ = "0.1.0"


def run(config, out=None, *, resume=False, progress=True):
    """Train one run (see :func:`sgdscope.train.run`) and return its directory."""
    from sgdscope.train import run as _run

    return _run(config, out, resume=resume, progress=progress)


def __getattr__(name):
    # Scope pulls in torch and the kernels: loaded on first use, so `import sgdscope` stays light
    if name == "Scope":
        from sgdscope.scope import Scope

        return Scope
    raise AttributeError(f"module 'sgdscope' has no attribute {name!r}")


__all__ = ["Scope", "run", "__version__"]
