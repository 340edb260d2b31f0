"""``sgdscope check DIR``: SQLite's integrity check of a run store, the store's own invariants, and
whether the run can resume."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgdscope.errors import StoreDamagedError
from sgdscope.store import DB_FILE, UNIQUE_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from sgdscope.store import RunStore


@dataclass
class CheckReport:
    """What :meth:`RunStore.check` found. ``healthy`` is False when SQLite's integrity check or one of the
    store's own invariants failed; ``can_resume`` says whether ``sgdscope run ... --resume`` would continue."""

    path: Path
    state: str
    integrity: str = "ok"  # "ok", or what SQLite (or the header check) found
    problems: list[str] = field(default_factory=list)  # broken invariants, one line each
    notes: list[str] = field(default_factory=list)  # facts that are fine: row counts, the checkpoint's step
    can_resume: bool = False
    resume: str = ""  # why it can or cannot resume

    @property
    def healthy(self) -> bool:
        return self.integrity == "ok" and not self.problems

    def lines(self) -> list[str]:
        """The findings as lines for a terminal."""
        out = [f"run: {self.path}", f"  state: {self.state}", f"  sqlite integrity: {self.integrity}"]
        out += [f"  {n}" for n in self.notes]
        out += [f"  PROBLEM: {p}" for p in self.problems]
        out.append(f"  resume: {'yes' if self.can_resume else 'no'} ({self.resume})")
        out.append(f"  verdict: {'healthy' if self.healthy else 'damaged'}")
        return out


def check_store(self: "RunStore") -> CheckReport:
    """Check the store without changing its data: SQLite's integrity check, then the store's invariants (no
    step committed twice, no row past the end of a finished run, ``status.json`` agreeing with
    ``checkpoints/last.pt``), and whether the run can resume."""
    status = self.status()
    state, step = status.get("state", "?"), status.get("step")
    rep = CheckReport(self.path, state)
    db = self.path / DB_FILE
    if not db.is_file():
        rep.notes.append(f"{DB_FILE}: absent (no rows written yet)")
    else:
        try:
            with self._guard():
                rep.integrity = "; ".join(r[0] for r in self.db.execute("PRAGMA integrity_check(5)"))
                if rep.integrity == "ok":
                    _check_rows(self, rep, state, step)
        except StoreDamagedError as err:
            rep.integrity = err.reason
    ckpt_step = _check_checkpoint(self, rep, state, step)
    pid = self.writer_pid()
    if not rep.healthy:
        rep.resume = "the store is damaged; resuming would build on it"
    elif pid is not None and not self._lock.held:
        rep.resume = f"PID {pid} is writing to it now"
    elif state == "done":
        rep.resume = "the run is done"
    elif state in ("running", "interrupted", "failed"):
        rep.can_resume = True
        rep.resume = "`sgdscope run CONFIG --out DIR --resume` continues " + (
            f"from the checkpoint at step {ckpt_step}" if ckpt_step is not None else "from step 0 (no checkpoint)")
    else:
        rep.resume = f"unknown state {state!r}"
    return rep

def _check_rows(self: "RunStore", rep: CheckReport, state: str, step: Any) -> None:
    names = self._table_names()
    counts = {t: self.db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in names}
    rep.notes.append("rows: " + (", ".join(f"{t} {n}" for t, n in counts.items()) or "none"))
    for table, key in UNIQUE_KEYS.items():
        if table not in names or not set(key) <= self._column_names(table):
            continue
        cols = ", ".join(f'"{k}"' for k in key)
        dup = self.db.execute(f'SELECT {cols}, COUNT(*) FROM "{table}" GROUP BY {cols} HAVING COUNT(*) > 1 '
                              f"ORDER BY {cols}").fetchall()
        if dup:
            first = ", ".join(f"{k}={v}" for k, v in zip(key, dup[0]))
            rep.problems.append(f"{table}: {len(dup)} {'/'.join(key)} value(s) appear more than once "
                                f"(first: {first}, {dup[0][-1]} rows); two writers, or a resume that kept old rows")
    if state == "done" and isinstance(step, int):
        for table in names:
            if "logged_at" not in self._column_names(table):
                continue
            n = self.db.execute(f'SELECT COUNT(*) FROM "{table}" WHERE logged_at > ?', (step,)).fetchone()[0]
            if n:
                rep.problems.append(f"{table}: {n} row(s) logged after step {step}, where the finished run ends")

def _check_checkpoint(self: "RunStore", rep: CheckReport, state: str, step: Any) -> int | None:
    """Compare ``checkpoints/last.pt`` with the status and the rows; its step, or None without one."""
    path = self.path / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    import torch  # only here: checking rows alone needs no torch

    try:
        with warnings.catch_warnings():  # torch's advice on foreign pickles is not ours to print
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor is read
    except Exception as err:  # noqa: BLE001 - any failure to read it means it cannot be resumed from
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        rep.problems.append(f"checkpoints/last.pt: unreadable with weights_only=True ({first[:200]})")
        return None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
        rep.problems.append("checkpoints/last.pt: not a sgdscope run checkpoint (no integer 'step')")
        return None
    ckpt_step = ckpt["step"]
    rep.notes.append(f"checkpoints/last.pt: step {ckpt_step}")
    if state == "done" and step != ckpt_step:
        rep.problems.append(f"status.json says the run finished at step {step}, checkpoints/last.pt is at step "
                            f"{ckpt_step}")
    elif state in ("interrupted", "failed") and isinstance(step, int) and ckpt_step > step:
        rep.problems.append(f"checkpoints/last.pt is at step {ckpt_step}, past status.json's step {step}")
    if rep.integrity == "ok" and "train" in self.tables() and "step" in self._column_names("train"):
        last = self.db.execute('SELECT MAX(step) FROM "train"').fetchone()[0]
        if last is not None and ckpt_step > last:
            rep.problems.append(f"checkpoints/last.pt is at step {ckpt_step}, but the train table ends at step "
                                f"{last}: the rows between would be missing after a resume")
    return ckpt_step
