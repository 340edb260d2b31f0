import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgdscope.errors import RunStoreError, StoreDamagedError
from sgdscope.store import RunStore, writer_lock


def test_append_read_and_new_columns(tmp_path):
    s = RunStore.create(tmp_path / "r", {"seed": 1})
    s.append("t", [{"step": 1, "a": 1.0}])
    s.append("t", [{"step": 2, "a": 2.0, "b": "x"}])
    df = RunStore(tmp_path / "r").table("t")
    assert df["step"].tolist() == [1, 2]
    assert df["b"].tolist()[1] == "x"
    assert RunStore(tmp_path / "r").config() == {"seed": 1}


def test_nonfinite_values_read_back_as_nan(tmp_path):
    s = RunStore.create(tmp_path / "r", {})
    s.append("t", [{"step": 1, "v": float("nan")}, {"step": 2, "v": 1.5}])
    v = s.table("t")["v"].tolist()
    assert math.isnan(v[0]) and v[1] == 1.5


def test_append_many_is_all_or_nothing(tmp_path):
    s = RunStore.create(tmp_path / "r", {})
    s.append("a", [{"step": 1}])

    class Boom:
        def __repr__(self):
            raise RuntimeError

    with pytest.raises(Exception):
        s.append_many({"a": [{"step": 2}], "b": [{"step": 2, "x": object()}]})
    assert s.table("a")["step"].tolist() == [1]
    assert "b" not in s.tables() or len(s.table("b")) == 0


def test_truncate_after_uses_logged_at(tmp_path):
    s = RunStore.create(tmp_path / "r", {})
    s.append("train", [{"step": i, "logged_at": i} for i in range(6)])
    s.append("interpolation", [{"step": 4, "logged_at": 5}])
    s.truncate_after(4)
    assert s.table("train")["step"].tolist() == [0, 1, 2, 3, 4]
    assert len(s.table("interpolation")) == 0


def test_not_a_run_and_other_version(tmp_path):
    with pytest.raises(RunStoreError, match="not a sgdscope run"):
        RunStore(tmp_path)
    s = RunStore.create(tmp_path / "r", {})
    s.set_status("done")
    (tmp_path / "r" / "status.json").write_text('{"state": "done", "format": 99}')
    with pytest.raises(RunStoreError, match="format"):
        RunStore(tmp_path / "r")


def test_concurrent_reader_sees_whole_transactions(tmp_path):
    s = RunStore.create(tmp_path / "r", {})
    s.append("t", [{"step": 0, "i": 0}])
    stop = threading.Event()

    def writer():
        w = RunStore(tmp_path / "r")
        for step in range(1, 150):
            w.append("t", [{"step": step, "i": i} for i in range(10)])
        w.close()
        stop.set()

    th = threading.Thread(target=writer)
    th.start()
    reader = RunStore(tmp_path / "r")
    seen = 0
    while not stop.is_set() or seen == 0:
        df = reader.table("t")
        counts = df[df.step > 0].groupby("step").size()
        assert (counts == 10).all()  # never half a transaction
        seen += 1
    th.join()
    assert len(reader.table("t")) == 1 + 149 * 10


# ------------------------------------------------------------------------------------- one writer


_HOLDER = """
import sys
from sgdscope.store import RunStore
store = RunStore(sys.argv[1])  # the lock lives as long as this object
store.acquire_writer()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin (or kills us)
"""


def _hold_in_subprocess(run_dir):
    """A second process that holds ``run_dir``'s writer lock until its stdin closes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_in_another_process_fails_naming_the_pid(tmp_path):
    RunStore.create(tmp_path / "r", {}).close()
    holder = _hold_in_subprocess(tmp_path / "r")
    try:
        with pytest.raises(RunStoreError) as err:
            RunStore(tmp_path / "r").acquire_writer()
        msg = str(err.value)
        assert msg == (f"{tmp_path / 'r'}: another sgdscope process (PID {holder.pid}) is writing to it; "
                       "wait for it or stop it")
        assert RunStore(tmp_path / "r").writer_pid() == holder.pid
        with pytest.raises(RunStoreError, match=f"PID {holder.pid}"):
            RunStore.create(tmp_path / "r", {"seed": 9}, writer=True)
        assert RunStore(tmp_path / "r").config() == {}  # the refused creator wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    s = RunStore(tmp_path / "r")  # released by a clean exit: free again
    s.acquire_writer()
    assert (tmp_path / "r" / ".lock").read_text().strip() == str(os.getpid())
    s.close()


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    RunStore.create(tmp_path / "r", {}).close()
    holder = _hold_in_subprocess(tmp_path / "r")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / "r" / ".lock").read_text().strip() == str(holder.pid)  # the dead writer's PID is left behind
    assert RunStore(tmp_path / "r").writer_pid() is None
    s = RunStore(tmp_path / "r")
    s.acquire_writer()  # no stale-lock error: the kernel dropped the dead process's flock
    assert (tmp_path / "r" / ".lock").read_text().strip() == str(os.getpid())
    s.close()


def test_writer_lock_is_idempotent_and_released_by_close(tmp_path):
    a = RunStore.create(tmp_path / "r", {}, writer=True)
    a.acquire_writer()  # a no-op for its own holder
    assert a.writer_pid() == os.getpid()
    b = RunStore(tmp_path / "r")
    with pytest.raises(RunStoreError, match=f"PID {os.getpid()}"):  # two stores in one process conflict too
        b.acquire_writer()
    assert b.writer_pid() == os.getpid()
    a.release_writer()
    b.acquire_writer()
    a.close()  # not the holder any more: closing it leaves b's lock alone
    with pytest.raises(RunStoreError):
        a.acquire_writer()
    b.close()
    assert RunStore(tmp_path / "r").writer_pid() is None
    assert (tmp_path / "r" / ".lock").read_text() == ""  # no PID of a process that no longer writes


def test_writer_lock_context_for_a_sweep_directory(tmp_path):
    d = tmp_path / "sweep"
    with writer_lock(d) as got:
        assert got == d and d.is_dir()
        with pytest.raises(RunStoreError, match=f"{d}: another sgdscope process \\(PID {os.getpid()}\\)"):
            with writer_lock(d):
                pass
    with writer_lock(d):  # released on leaving the block
        pass


# ---------------------------------------------------------------------------------------- damage


def _real_db(tmp_path):
    """A store with enough rows for metrics.db to span many pages, closed (so no WAL is left)."""
    s = RunStore.create(tmp_path / "r", {})
    s.append("train", [{"step": i, "logged_at": i, "batch_loss": 1.0 / (i + 1), "note": "x" * 200} for i in range(300)])
    s.close()
    return tmp_path / "r"


def _zero_length(db):
    db.write_bytes(b"")


def _random_bytes(db):
    db.write_bytes(np.random.default_rng(0).bytes(8192))


def _truncated(db):
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _scribbled(db):
    """Garbage over the pages after the first: the header is whole, the tables are not."""
    raw = bytearray(db.read_bytes())
    raw[4096:] = np.random.default_rng(1).bytes(len(raw) - 4096)
    db.write_bytes(bytes(raw))


DAMAGE = {"zero-length": _zero_length, "random-bytes": _random_bytes, "truncated": _truncated,
          "scribbled": _scribbled}


# tables() reads only the schema on page 1, which "scribbled" leaves whole: there the damage shows at table()
DAMAGE_CALLS = [(d, c) for d in DAMAGE for c in ("table", "tables", "append_many", "truncate_after")
                if (d, c) != ("scribbled", "tables")]


@pytest.mark.parametrize("damage, call", DAMAGE_CALLS)
def test_damaged_db_raises_one_line_store_error(tmp_path, damage, call):
    d = _real_db(tmp_path)
    db = d / "metrics.db"
    DAMAGE[damage](db)
    before = db.read_bytes()
    s = RunStore(d)
    with pytest.raises(StoreDamagedError) as err:
        if call == "table":
            s.table("train")
        elif call == "tables":
            s.tables()
        elif call == "append_many":
            s.append_many({"train": [{"step": 999}]})
        else:
            s.truncate_after(3)
    msg = str(err.value)
    assert msg.startswith(f"{db}: the store is damaged (") and msg.endswith(f"; run `sgdscope check {d}`")
    assert "\n" not in msg
    assert isinstance(err.value, RunStoreError)
    assert db.read_bytes() == before  # nothing was "repaired" into an empty database
    rep = RunStore(d).check()
    assert not rep.healthy and rep.integrity != "ok" and not rep.can_resume


@pytest.mark.parametrize("damage, words", [("zero-length", "zero-length file"),
                                           ("random-bytes", "not an SQLite database"),
                                           ("truncated", "truncated: "), ("scribbled", "malformed")])
def test_damage_reasons_say_what_was_found(tmp_path, damage, words):
    d = _real_db(tmp_path)
    DAMAGE[damage](d / "metrics.db")
    with pytest.raises(StoreDamagedError, match=words) as err:
        RunStore(d).table("train")
    assert words in err.value.reason

# ----------------------------------------------------------------------------------------- check


def _finished(tmp_path, steps=5):
    s = RunStore.create(tmp_path / "r", {})
    s.append("train", [{"step": i, "logged_at": i} for i in range(steps + 1)])
    s.append("eigen", [{"step": i, "index": j, "value": 1.0, "logged_at": i} for i in (0, steps) for j in (1, 2)])
    s.set_status("done", step=steps, epoch=1)
    torch.save({"format": 1, "step": steps, "model": {}}, tmp_path / "r" / "checkpoints" / "last.pt")
    s.close()
    return tmp_path / "r"


def test_check_of_a_healthy_finished_run(tmp_path):
    rep = RunStore(_finished(tmp_path)).check()
    assert rep.healthy and rep.integrity == "ok" and rep.problems == []
    assert not rep.can_resume and "done" in rep.resume
    assert "checkpoints/last.pt: step 5" in rep.notes and "rows: eigen 4, train 6" in rep.notes
    assert rep.lines()[-1] == "  verdict: healthy"


def test_check_of_an_interrupted_run_says_it_can_resume(tmp_path):
    d = _finished(tmp_path)
    RunStore(d).set_status("interrupted", step=5)
    rep = RunStore(d).check()
    assert rep.healthy and rep.can_resume and "checkpoint at step 5" in rep.resume
    (d / "checkpoints" / "last.pt").unlink()
    assert "from step 0" in RunStore(d).check().resume


def test_check_finds_duplicate_steps_and_eigen_rows(tmp_path):
    d = _finished(tmp_path)
    RunStore(d).append_many({"train": [{"step": 3, "logged_at": 3}],
                             "eigen": [{"step": 5, "index": 2, "value": 1.0, "logged_at": 5}]})
    rep = RunStore(d).check()
    assert not rep.healthy and not rep.can_resume
    assert any(p.startswith("train: 1 step value(s) appear more than once (first: step=3, 2 rows)") for p in rep.problems)
    assert any(p.startswith("eigen: 1 step/index value(s)") and "step=5, index=2" in p for p in rep.problems)


def test_check_finds_rows_past_the_end_and_a_checkpoint_that_disagrees(tmp_path):
    d = _finished(tmp_path)
    RunStore(d).append("train", [{"step": 6, "logged_at": 6}])
    rep = RunStore(d).check()
    assert rep.problems == ["train: 1 row(s) logged after step 5, where the finished run ends"]
    d2 = _finished(tmp_path / "b")
    torch.save({"format": 1, "step": 3, "model": {}}, d2 / "checkpoints" / "last.pt")
    assert RunStore(d2).check().problems == [
        "status.json says the run finished at step 5, checkpoints/last.pt is at step 3"]
    RunStore(d2).set_status("interrupted", step=2)
    torch.save({"format": 1, "step": 9, "model": {}}, d2 / "checkpoints" / "last.pt")
    problems = RunStore(d2).check().problems
    assert any("past status.json's step 2" in p for p in problems)
    assert any("the train table ends at step 5" in p for p in problems)
    (d2 / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert RunStore(d2).check().problems[0].startswith("checkpoints/last.pt: unreadable with weights_only=True")


def test_check_says_a_live_writer_blocks_a_resume(tmp_path):
    d = _finished(tmp_path)
    RunStore(d).set_status("running", step=5)
    w = RunStore(d)
    w.acquire_writer()
    rep = RunStore(d).check()
    assert rep.healthy and not rep.can_resume and rep.resume == f"PID {os.getpid()} is writing to it now"
    w.close()
    assert RunStore(d).check().can_resume


# ------------------------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=int(os.environ.get("SGDSCOPE_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _read_everything(run_dir) -> None:
    """Every read a report makes, and a check: each either works or is a one-line StoreDamagedError."""
    s = RunStore(run_dir)
    try:
        for name in s.tables():
            s.table(name)
    except StoreDamagedError as err:
        assert "\n" not in str(err)
    finally:
        s.close()
    rep = RunStore(run_dir).check()
    assert isinstance(rep.healthy, bool) and rep.lines()


@functools.lru_cache(maxsize=1)
def _real_db_bytes() -> bytes:
    """The bytes of a real store's metrics.db, made once (a plain function, not a fixture, so that
    Hypothesis does not print 90 kB of it with every failing example)."""
    with tempfile.TemporaryDirectory() as tmp:
        return (_real_db(Path(tmp)) / "metrics.db").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 2**20), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 2**20))
def test_mutated_metrics_db_gives_rows_or_a_store_error(edits, cut):
    """A real store with bytes overwritten and maybe cut short: never a raw sqlite3 error."""
    raw = bytearray(_real_db_bytes())
    for at, data in edits:
        at %= len(raw)
        raw[at:at + len(data)] = data
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        RunStore.create(Path(tmp) / "r", {}).close()
        (Path(tmp) / "r" / "metrics.db").write_bytes(bytes(raw))
        _read_everything(Path(tmp) / "r")


@FUZZ
@given(st.binary(max_size=2000) | st.just(b"SQLite format 3\x00") | st.binary(max_size=200).map(
    lambda b: b"SQLite format 3\x00" + b))
def test_arbitrary_bytes_as_metrics_db(raw):
    with tempfile.TemporaryDirectory() as tmp:
        RunStore.create(Path(tmp) / "r", {}).close()
        (Path(tmp) / "r" / "metrics.db").write_bytes(raw)
        _read_everything(Path(tmp) / "r")


def test_zero_length_db_of_a_writer_that_is_starting_is_not_damage(tmp_path):
    """SQLite makes metrics.db empty and writes its header a moment later; a reader that comes in between,
    while the writer holds the lock, sees an empty store. The writer itself, and anyone once the lock is
    free, sees damage."""
    d = tmp_path / "r"
    w = RunStore.create(d, {}, writer=True)
    (d / "metrics.db").write_bytes(b"")
    assert RunStore(d).tables() == []
    with pytest.raises(StoreDamagedError, match="zero-length"):
        w.tables()
    w.close()
    with pytest.raises(StoreDamagedError, match="zero-length"):
        RunStore(d).tables()
