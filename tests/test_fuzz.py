"""Fuzz tests (issue 7): arbitrary values and bytes never give a traceback, only a ConfigError/DataError
(one line) or a valid result. Covers the config parser (``validate``, ``apply_overrides``, ``load_raw``)
and the dataset readers (CIFAR pickle batches, MNIST idx files plain and gzipped, PTB text, Tiny
ImageNet JPEGs and annotations)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import yaml

from sgdscope.config import RunConfig, apply_overrides, load_raw, to_dict, validate
from sgdscope.data import load_dataset
from sgdscope.config import DataConfig
from sgdscope.errors import ConfigError, DataError

N_EXAMPLES = int(os.environ.get("SGDSCOPE_FUZZ_EXAMPLES", "80"))  # raise it for a longer fuzzing session
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _one_line(err: Exception) -> None:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)


# ---------------------------------------------------------------------------------------------- config

SCALARS = (
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.binary(max_size=6)
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)


def _paths(model: type, prefix: str = "") -> list[str]:
    """Every dotted key of the config models (sections and leaves)."""
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        for t in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += _paths(t, prefix + name + ".")
    return out


KEY_PATHS = _paths(RunConfig)
VALID = {
    "seed": 1, "device": "cpu",
    "data": {"name": "synthetic", "n_samples": 50, "input_shape": [4]},
    "model": {"name": "mlp", "widths": [3]},
    "optimizer": {"lr": 0.1, "batch_size": 8},
    "probes": {"eigen": {"k": 2}, "interpolation": {"alphas": [0, 0.5, 1]}, "direction": {}, "alpha_step": {},
               "alignment": {}},
}


def _set_path(raw: dict, path: str, value) -> dict:
    node = raw
    *head, last = path.split(".")
    for h in head:
        nxt = node.get(h)
        if not isinstance(nxt, dict):
            nxt = node[h] = {}
        node = nxt
    node[last] = value
    return raw


def _key_paths(raw: dict, prefix: tuple = ()):
    """Every key path of a nested mapping, sections and leaves."""
    for k, v in raw.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _key_paths(v, prefix + (k,))


def _validate_ok_or_config_error(raw) -> None:
    """Either a one-line ConfigError, or a config that survives what a run does with it: ``to_dict`` keeps
    every key the user gave, validating the dump gives the same config, and the dump comes back unchanged
    through YAML (the run directory's config.yaml, which resume compares with)."""
    try:
        cfg = validate(raw)
    except ConfigError as err:
        _one_line(err)
        return
    _check_roundtrip(raw, cfg)


def _check_roundtrip(raw: dict, cfg: RunConfig) -> None:
    dumped = to_dict(cfg)
    for path in _key_paths(raw):
        node = dumped
        for part in path:
            assert isinstance(node, dict) and part in node, f"key {'.'.join(map(str, path))} lost by to_dict"
            node = node[part]
    assert validate(dumped) == cfg
    assert yaml.safe_load(yaml.safe_dump(dumped, sort_keys=False)) == dumped


def test_valid_config_roundtrips():
    """The base of the fuzzed configs is valid, so the fuzzing below starts from the roundtrip path."""
    _check_roundtrip(VALID, validate(VALID))


@FUZZ
@given(st.dictionaries(st.sampled_from(list(VALID)) | st.text(max_size=10), VALUES, max_size=6))
def test_validate_arbitrary_mappings(raw):
    _validate_ok_or_config_error(raw)


@FUZZ
@given(VALUES)
def test_validate_arbitrary_values(raw):
    _validate_ok_or_config_error(raw)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEY_PATHS), VALUES), min_size=1, max_size=4))
def test_validate_valid_config_with_fuzzed_fields(changes):
    """Start from a valid config and replace known fields (sections or leaves) with arbitrary values."""
    import copy

    raw = copy.deepcopy(VALID)
    for path, value in changes:
        _set_path(raw, path, value)
    _validate_ok_or_config_error(raw)


OVERRIDE_TEXT = st.text(max_size=40) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(KEY_PATHS) | st.text(max_size=12),
    st.text(max_size=20) | st.sampled_from(["[1, 2", "{a: 1}", "null", "-1", "1e400", "!!python/object:os.system x",
                                             "[0, 0.5, 0.2, 1]", "2020-01-01", "~", "&a [*a]", "'", "0x10", ".inf"]),
)


@FUZZ
@given(st.lists(OVERRIDE_TEXT, max_size=5))
def test_apply_overrides_arbitrary_strings(items):
    import copy

    raw = copy.deepcopy(VALID)
    try:
        raw = apply_overrides(raw, items)
    except ConfigError as err:
        _one_line(err)
        return
    _validate_ok_or_config_error(raw)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_load_raw_arbitrary_file_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(data)
        try:
            raw = load_raw(p)
        except ConfigError as err:
            _one_line(err)
            return
        assert isinstance(raw, dict)
        _validate_ok_or_config_error(raw)


# --------------------------------------------------------------------------------------------- readers


def _load(name: str, root: Path, **kw):
    """load_dataset must succeed or raise a one-line DataError/ConfigError (never anything else)."""
    try:
        d = load_dataset(DataConfig(name=name, root=str(root), **kw), seed=0)
    except (DataError, ConfigError) as err:
        _one_line(err)
        return None
    assert len(d.train) > 0
    return d


def _mutations(valid: bytes):
    """Valid bytes truncated, with bytes overwritten, or with bytes inserted (gets past the header checks)."""
    n = len(valid)
    trunc = st.integers(0, n).map(lambda k: valid[:k])
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda fl: bytes(_apply(bytearray(valid), fl)))
    ins = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=8)).map(lambda t: valid[: t[0]] + t[1] + valid[t[0]:])
    return trunc | flips | ins


def _apply(buf: bytearray, flips) -> bytearray:
    for i, v in flips:
        buf[i] = v
    return buf


def _cifar_batch(seed: int, n: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n)]}


VALID_CIFAR = pickle.dumps(_cifar_batch(0), protocol=3)
SMALL_CIFAR = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}, protocol=2)


@FUZZ
@given(st.sampled_from(["data_batch_1", "data_batch_5", "test_batch"]),
       st.binary(max_size=400) | _mutations(VALID_CIFAR) | _mutations(SMALL_CIFAR))
def test_cifar_reader_arbitrary_bytes(fname, data):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "cifar-10-batches-py"
        root.mkdir()
        for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
            (root / name).write_bytes(pickle.dumps(_cifar_batch(i), protocol=3))
        (root / fname).write_bytes(data)
        _load("cifar10", Path(d), flatten=True)


@FUZZ
@given(st.dictionaries(st.sampled_from([b"data", "data", b"labels", "labels", b"fine_labels", 0]),
                       st.none() | st.integers() | st.lists(st.integers(-3, 120), max_size=4) | st.text(max_size=4)
                       | st.builds(lambda shape, dt: np.zeros(shape, dt),
                                   st.lists(st.integers(0, 3072), max_size=3).map(tuple)
                                   .filter(lambda s: int(np.prod(s)) <= 20000),
                                   st.sampled_from([np.uint8, np.int64, np.float32, np.bool_])),
                       max_size=4))
def test_cifar_reader_arbitrary_pickled_objects(obj):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "cifar-100-python"
        root.mkdir()
        good = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 99]}
        (root / "test").write_bytes(pickle.dumps(good))
        (root / "train").write_bytes(pickle.dumps(obj))
        _load("cifar100", Path(d), flatten=True, val_size=0, test_size=1)


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


MNIST_FILES = {
    "train-images-idx3-ubyte": _idx(np.random.default_rng(0).integers(0, 256, (12, 28, 28))),
    "train-labels-idx1-ubyte": _idx(np.arange(12) % 10),
    "t10k-images-idx3-ubyte": _idx(np.zeros((3, 28, 28))),
    "t10k-labels-idx1-ubyte": _idx(np.arange(3)),
}

IDX_HEADERS = st.builds(
    lambda magic, dims, payload: struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload,
    st.sampled_from([0x801, 0x803, 0x802, 0x804, 0x0D03, 0x800]) | st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 40) | st.integers(0, 2**32 - 1), max_size=4),
    st.binary(max_size=600),
)


@FUZZ
@given(st.sampled_from(list(MNIST_FILES)), st.booleans(),
       st.binary(max_size=300) | IDX_HEADERS | _mutations(MNIST_FILES["train-labels-idx1-ubyte"])
       | _mutations(MNIST_FILES["t10k-images-idx3-ubyte"][:16] + bytes(3 * 28 * 28)))
def test_idx_reader_arbitrary_bytes(fname, gz, data):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name, raw in MNIST_FILES.items():
            (root / name).write_bytes(raw)
        if gz:  # the gzipped variant: sometimes a valid gzip of the bytes, sometimes the bytes themselves
            (root / fname).unlink()
            (root / (fname + ".gz")).write_bytes(gzip.compress(data) if len(data) % 2 else data)
        else:
            (root / fname).write_bytes(data)
        _load("mnist", root, flatten=True)


@FUZZ
@given(st.sampled_from(["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]),
       st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
       st.integers(1, 6))
def test_ptb_reader_arbitrary_bytes(fname, data, seq_len):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
            (root / name).write_text("a b c <unk>\nd e a\n" * 3)
        (root / fname).write_bytes(data)
        _load("ptb", root, seq_len=seq_len)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


@settings(max_examples=max(1, N_EXAMPLES // 2), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | _mutations(JPEG),
       st.text(max_size=80) | st.just("v.JPEG\tn01\t0\t0\t8\t8\n"),
       st.text(max_size=30) | st.just("n01\n"))
def test_tiny_imagenet_reader_arbitrary_files(image, annotations, wnids):
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "tiny-imagenet-200"
        (base / "val" / "images").mkdir(parents=True)
        (base / "train" / "n01" / "images").mkdir(parents=True)
        (base / "wnids.txt").write_text(wnids, encoding="utf-8", errors="surrogateescape")
        (base / "train" / "n01" / "images" / "a.JPEG").write_bytes(JPEG)
        (base / "train" / "n01" / "images" / "b.JPEG").write_bytes(image)
        (base / "val" / "images" / "v.JPEG").write_bytes(JPEG)
        (base / "val" / "val_annotations.txt").write_text(annotations, encoding="utf-8", errors="surrogateescape")
        _load("tiny_imagenet", Path(d), flatten=True, val_size=0)
