"""The two pieces both examples share, kept apart so that each example reads as its training loop:
the command line, and the closing summary of what was measured."""

import argparse

from sgdscope.report import write_report


def command_line(doc: str, name: str, steps: int, small_steps: int) -> argparse.Namespace:
    """``--steps``, ``--out`` and ``--small``; ``steps`` is filled in from the size when not given."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {steps}, or {small_steps} with --small)")
    parser.add_argument("--out", default=f"runs/{name}", help="the run directory the Scope writes (new or empty)")
    parser.add_argument("--small", action="store_true", help="a run of seconds, for CI")
    args = parser.parse_args()
    args.steps = args.steps or (small_steps if args.small else steps)
    return args


def summarize(scope) -> None:
    """Print how the top Hessian eigenvalue moved, then write the HTML report of the run directory."""
    eigen = scope.table("eigen")
    top = eigen[eigen["index"] == 1]
    print(f"lambda_1 from {top['value'].iloc[0]:.3g} at step 0 to {top['value'].iloc[-1]:.3g} at step {top['step'].iloc[-1]}")
    print(f"report: {write_report(scope.path)}")
