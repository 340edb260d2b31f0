"""The ``sgdscope`` command line. Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal
error or divergence, 130 interrupted (the run can be resumed with ``--resume``)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from sgdscope.errors import ConfigError, DivergenceError, PeerFailed, SgdscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Watch SGD walk through a neural network's loss landscape.")


def _fail(code: int, msg: str) -> None:
    typer.echo(f"sgdscope: {msg}", err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Turn known errors into one line and an exit code; tracebacks only with SGDSCOPE_DEBUG=1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except SgdscopeError as err:
            _fail(2, f"error: {err}")
        except DivergenceError as err:
            _fail(1, f"diverged: {err}")
        except PeerFailed as err:
            _fail(1, f"failed: {err}; measured rows are kept, continue with --resume")
        except KeyboardInterrupt:
            _fail(130, "interrupted; measured rows are kept, continue with --resume")
        except BrokenPipeError:  # the reader went away (`| head`): nothing left to say, and no error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as err:  # noqa: BLE001
            if os.environ.get("SGDSCOPE_DEBUG"):
                raise
            _fail(1, f"internal error: {type(err).__name__}: {err} (set SGDSCOPE_DEBUG=1 for the traceback)")

    return wrapper


def _check_out(path: Path) -> Path:
    """Refuse, before anything runs, an output directory that cannot be one: an existing file, a path under a
    file, or a place this process cannot write. An existing directory passes: a resume or a sweep continues
    it, and ``run`` itself refuses one that holds another run.

    Writability is tried (a directory made and removed where the output would go), not read from the mode
    bits, because root passes every permission check that /proc or a read-only mount still refuses.
    """
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: is an existing file; give a directory (new or existing)")
        base = path
        while not base.exists() and base.parent != base:  # the nearest existing folder is where it gets made
            base = base.parent
        if not base.is_dir():
            raise ConfigError(f"--out {path}: lies under the file {base}; give a directory (new or existing)")
        os.rmdir(tempfile.mkdtemp(dir=base, prefix=".sgdscope-write-test-"))
    except OSError as err:
        raise ConfigError(f"--out {path}: cannot be written ({err.strerror}); give a directory you can write") from None
    return path


def _load(config: str, overrides: list[str], device: Optional[str]):
    from sgdscope.config import apply_overrides, validate
    from sgdscope.recipes import resolve

    raw, meta = resolve(config)
    if device:
        overrides = [*overrides, f"device={device}"]
    return validate(apply_overrides(raw, overrides)), meta


def _summary(path: Path) -> None:
    from sgdscope.store import RunStore

    s = RunStore(path)
    ep = s.table("epoch")
    typer.echo(f"run: {path}")
    if len(ep):
        last = ep.iloc[-1].map(lambda v: float("nan") if v is None else v)  # an all-NULL column (no val/test set)
        typer.echo(
            f"  epoch {int(last.epoch)}: train loss {last.train_loss:.4f} acc {last.train_acc:.3f} | "
            f"val acc {last.val_acc:.3f} | test acc {last.test_acc:.3f}"
        )
    counts = ", ".join(f"{t} ({len(s.table(t))} rows)" for t in s.tables())
    typer.echo(f"  tables: {counts}")


@app.command("run")
@_guard
def run_cmd(
    config: Annotated[str, typer.Argument(help="YAML config file or bundled recipe name")],
    set_: Annotated[list[str], typer.Option("--set", help="override, e.g. optimizer.lr=0.05")] = [],
    out: Annotated[Optional[Path], typer.Option(help="run directory")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run in --out")] = False,
    on_nan: Annotated[Optional[str], typer.Option("--on-nan", help="stop | skip")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="mirror scalars to RUN_DIR/tb")] = False,
) -> None:
    """Train one run with its probes, writing a run directory."""
    if resume and out is None:
        _fail(2, "error: --resume needs --out RUN_DIR")
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 checks, writes and reports
    if out is not None and main:
        _check_out(out)
    from sgdscope.train import run

    extra = ([f"on_nan={on_nan}"] if on_nan else []) + (["tensorboard=true"] if tensorboard else [])
    cfg, _ = _load(config, [*set_, *extra], device)
    path = run(cfg, out, resume=resume, progress=True)
    if main:
        _summary(path)


@app.command()
@_guard
def export(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    format: Annotated[str, typer.Option("--format", help="csv | parquet")] = "csv",
    out: Annotated[Optional[Path], typer.Option(help="folder for the files (default RUN_DIR/export)")] = None,
) -> None:
    """Write every table of a run as CSV or Parquet files."""
    from sgdscope.store import RunStore

    if format not in ("csv", "parquet"):
        raise ConfigError(f"--format: {format!r} is not one of csv, parquet")
    dest = _check_out(out or run_dir / "export")
    store = RunStore(run_dir)
    frames = {name: store.table(name) for name in store.tables()}  # all read first: a damaged store writes nothing
    dest.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        path = dest / f"{name}.{format}"
        if format == "csv":
            df.to_csv(path, index=False)
        else:
            try:
                df.to_parquet(path, index=False)
            except ImportError:
                raise ConfigError("--format parquet needs pyarrow: pip install 'sgdscope[parquet]'") from None
        typer.echo(str(path))


@app.command()
@_guard
def recipes() -> None:
    """List the bundled reproductions: what each reproduces, its size and the claim it tests."""
    from sgdscope.recipes import list_recipes

    for r in list_recipes():
        typer.echo(f"{r.name:34s} [{r.size}] {r.reproduces}\n{'':37s}claim: {r.claim}")
        if r.grid:
            typer.echo(f"{'':37s}grid:  {'  '.join(f'{k}={v}' for k, v in r.grid.items())}")
        if r.estimate_line():
            typer.echo(f"{'':37s}time:  {r.estimate_line()}")


@app.command()
@_guard
def demo(out: Annotated[Path, typer.Option(help="where to write the demo")] = Path("demo-out")) -> None:
    """The tour: a short run on the embedded digits set, with measurements and a report."""
    from sgdscope.demo import demo as run_demo

    run_demo(_check_out(out))


@app.command()
@_guard
def sweep(
    config: Annotated[str, typer.Argument(help="YAML config file or bundled recipe name")],
    grid: Annotated[list[str], typer.Option("--grid", help="key=v1,v2,...; repeat for more axes")] = [],
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 as one more grid axis")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="sweep directory (an existing one is resumed)")] = None,
    backend: Annotated[str, typer.Option(help="local | ray")] = "local",
    workers: Annotated[Optional[int], typer.Option(help="runs at a time (default: one per core)")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (--backend ray)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override for every run, e.g. train.epochs=5")] = [],
) -> None:
    """Run a grid of runs (a recipe's own grid when no --grid is given); rerun to resume."""
    import time

    from sgdscope.config import apply_overrides
    from sgdscope.recipes import resolve
    from sgdscope.sweep import SweepFailed, parse_grid, run_sweep

    raw, meta = resolve(config)
    raw = apply_overrides(raw, set_)
    axes = parse_grid(grid) if grid else dict(meta.grid) if meta is not None and meta.grid else {}
    if not axes and seeds == 1:
        raise ConfigError("sweep: give at least one --grid key=v1,v2,... (or --seeds N); this config has no recipe grid")
    out = _check_out(out or Path("sweeps") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    try:
        path = run_sweep(raw, axes, out, backend=backend, workers=workers, seeds=seeds, address=address)
    except SweepFailed as err:
        typer.echo(str(err.path))
        _fail(1, f"{len(err.failures)} run(s) failed (listed above); rerun the same command to retry them")
    typer.echo(str(path))
    typer.echo(f"report: sgdscope report {path}", err=True)


@app.command()
@_guard
def report(path: Annotated[Path, typer.Argument(help="run or sweep directory")]) -> None:
    """Write a self-contained report.html next to the data and print its path."""
    from sgdscope.report import write_report

    typer.echo(str(write_report(path)))


@app.command()
@_guard
def plot(
    path: Annotated[Path, typer.Argument(help="run directory (or sweep directory for a sweep figure)")],
    figure: Annotated[str, typer.Argument(help="figure name; an unknown name lists them")],
) -> None:
    """Draw one figure into DIR/figures and print the PNG paths."""
    from sgdscope.plots import plot as draw

    for p in draw(path, figure):
        typer.echo(str(p))


@app.command()
@_guard
def check(path: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Check a run directory: SQLite's integrity check of metrics.db, the store's own invariants (no step
    committed twice, no row past a finished run's last step, status.json agreeing with checkpoints/last.pt)
    and whether the run can resume. Prints the findings; exits 0 when healthy, 2 when damaged."""
    from sgdscope.store import RunStore

    store = RunStore(path)
    try:
        rep = store.check()
    finally:
        store.close()  # the last connection to close removes SQLite's -wal and -shm files again
    for line in rep.lines():
        typer.echo(line)
    if not rep.healthy:
        what = rep.problems[0] if rep.integrity == "ok" else f"metrics.db: {rep.integrity}"
        more = len(rep.problems) + (rep.integrity != "ok") - 1
        _fail(2, f"error: {path}: the store is damaged: {what}" + (f" (and {more} more, listed above)" if more else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
