import math
import threading

import pytest

from sgdscope.errors import RunStoreError
from sgdscope.store import RunStore


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
