"""Datasets: tiny files in the real formats, the error messages, the embedded sets, the split and augmentation."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdscope.config import DataConfig
from sgdscope.data import augment_batch, load_dataset
from sgdscope.data.augment import MAX_SIGNAL_SHIFT, image_pad
from sgdscope.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------- file writers


def _pickle(path: Path, obj: object, legacy_numpy_name: bool = False) -> None:
    # Protocol 3 stores numpy arrays via the same globals as the original Python 2 files.
    raw = pickle.dumps(obj, protocol=3)
    if legacy_numpy_name:  # the original CIFAR files name numpy's pre-2.0 module
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(raw)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path, n: int = 4) -> dict[str, np.ndarray]:
    """Five training batches and a test batch of ``n`` images each, with bytes keys."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = _images(rng, n), [int(v) for v in rng.integers(0, 10, n)]
        _pickle(d / name, {b"batch_label": b"x", b"data": data, b"labels": labels}, legacy_numpy_name=i == 0)
        written[name] = (data, np.array(labels))
    return written


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def write_mnist(root: Path, gz: bool, n_train: int = 30, n_test: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(n_train, 28, 28))
    write_idx(root / "train-images-idx3-ubyte", train, gz)
    write_idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), gz)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, size=(n_test, 28, 28)), gz)
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz)
    return train


def write_tiny(root: Path) -> Path:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # not sorted, to check that labels follow the sorted order
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(2)
    lines = []
    for w in wnids:
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(base / "val" / "images" / f"val_{w}.JPEG")
        lines.append(f"val_{w}.JPEG\t{w}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


PTB_TRAIN = "the cat sat\nthe dog sat on the mat\na cat <unk>\n"
PTB_VALID = "the cat sat on a mat\n"
PTB_TEST = "a dog sat zebra\n"


def write_ptb(root: Path) -> None:
    for name, text in [("ptb.train.txt", PTB_TRAIN), ("ptb.valid.txt", PTB_VALID), ("ptb.test.txt", PTB_TEST)]:
        (root / name).write_text(text)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ CIFAR


def test_cifar10_reads_bytes_key_batches_and_splits(tmp_path):
    written = write_cifar10(tmp_path)
    d = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (18, 2, 4)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.task == "classification"
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert torch.equal(d.test.y, torch.from_numpy(written["test_batch"][1]))
    mean, std = d.info["normalisation"]["mean"], d.info["normalisation"]["std"]
    expected = written["test_batch"][0].reshape(-1, 3, 32, 32) / 255.0
    expected = (expected - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(d.test.x.numpy(), expected, atol=1e-5)
    assert torch.allclose(d.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert len(d.info["files"]) == 6 and d.info["split_seed"] == 0


def test_cifar100_str_keys_in_root_itself(tmp_path):
    rng = np.random.default_rng(3)
    for name, n in [("train", 10), ("test", 3)]:
        labels = [int(v) for v in rng.integers(0, 100, n)]
        _pickle(tmp_path / name, {"data": _images(rng, n), "fine_labels": labels, "coarse_labels": [0] * n})
    d = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), val_size=2), seed=1)
    assert (len(d.train), len(d.val), len(d.test), d.num_classes) == (8, 2, 3, 100)


def test_cifar_missing_batch_names_file_and_folder(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    msg = one_line(err)
    assert "data_batch_3" in msg and str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:500]), "truncated"),
        (lambda p: p.write_bytes(b"\x80\x03garbage"), "not a valid"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": __import__("os").getcwd}, protocol=3)), "refused"),
        (lambda p: _pickle(p, {b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}), "(N, 3072)"),
        (lambda p: _pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels outside"),
        (lambda p: _pickle(p, [1, 2]), "not a dict"),
    ],
)
def test_cifar_corrupt_batch_is_a_data_error(tmp_path, damage, words):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    damage(path)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    msg = one_line(err)
    assert str(path) in msg and words in msg


def test_file_backed_dataset_without_root():
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="mnist"), seed=0)
    assert "data.root" in one_line(err)


# --------------------------------------------------------------------------------------------- MNIST idx


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gzip(tmp_path, gz):
    write_mnist(tmp_path, gz)
    d = load_dataset(DataConfig(name="mnist", root=str(tmp_path), train_size=20, test_size=5), seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (20, 3, 5)
    assert d.input_shape == (1, 28, 28)
    assert d.test.y.tolist() == [0, 1, 2, 3, 4]
    assert all(f.endswith(".gz") == gz for f in d.info["files"])


def test_fashion_mnist_flat_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw, gz=True)
    d = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), flatten=True), seed=0)
    assert d.input_shape == (784,) and d.train.x.shape[1] == 784


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
        (lambda p: p.write_bytes(struct.pack(">I", 0x0801) + p.read_bytes()[4:]), "magic number"),
        (lambda p: p.write_bytes(b"\x00\x00"), "shorter than the header"),
    ],
)
def test_idx_damage_is_a_data_error(tmp_path, damage, words):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    damage(path)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
    msg = one_line(err)
    assert str(path) in msg and words in msg and "idx3" in msg


def test_idx_truncated_gzip_and_missing_file(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
    assert str(path) in one_line(err)
    path.unlink()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
    assert "'t10k-images-idx3-ubyte' is missing" in one_line(err) and str(tmp_path) in str(err.value)


def test_idx_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7), gz=False)
    with pytest.raises(DataError, match="30 images but .* 7 labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)


# ----------------------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_tree(tmp_path):
    write_tiny(tmp_path)
    d = load_dataset(DataConfig(name="tiny_imagenet", root=str(tmp_path), val_size=1), seed=0)
    assert d.input_shape == (3, 8, 8) and d.num_classes == 2
    assert (len(d.train), len(d.val), len(d.test)) == (3, 1, 2)
    assert d.info["classes"] == ["n01", "n02"]
    assert d.test.y.tolist() == [1, 0]  # annotations list n02 first; n02 is class 1 after sorting


def test_tiny_imagenet_subset(tmp_path):
    write_tiny(tmp_path)
    cfg = DataConfig(name="tiny_imagenet", root=str(tmp_path), tiny_classes=1, tiny_per_class=2, val_size=0)
    d = load_dataset(cfg, seed=0)
    assert d.num_classes == 1 and len(d.train) == 2 and len(d.val) == 0 and d.test.y.tolist() == [0]
    with pytest.raises(ConfigError, match="data.tiny_classes"):
        load_dataset(DataConfig(name="tiny_imagenet", root=str(tmp_path), tiny_classes=3), seed=0)


def test_tiny_imagenet_broken_files(tmp_path):
    base = write_tiny(tmp_path)
    bad = base / "train" / "n01" / "images" / "n01_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="tiny_imagenet", root=str(tmp_path)), seed=0)
    assert str(bad) in one_line(err)
    (base / "val" / "val_annotations.txt").unlink()
    bad.unlink()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="tiny_imagenet", root=str(tmp_path)), seed=0)
    assert "val_annotations.txt" in one_line(err) and str(base) in str(err.value)


# -------------------------------------------------------------------------------------------------- PTB


def test_ptb_vocabulary_and_sequences(tmp_path):
    write_ptb(tmp_path)
    d = load_dataset(DataConfig(name="ptb", root=str(tmp_path), seq_len=3), seed=0)
    words = PTB_TRAIN.replace("\n", " <eos> ").split()
    counts = {w: words.count(w) for w in words}
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    assert d.task == "lm" and d.num_classes == len(vocab) and d.input_shape == (3,)
    ids = torch.tensor([vocab.index(w) for w in words])
    n = (len(ids) - 1) // 3
    assert torch.equal(d.train.x, ids[: 3 * n].reshape(n, 3))
    assert torch.equal(d.train.y, ids[1 : 3 * n + 1].reshape(n, 3))
    assert d.train.x.dtype == torch.int64
    # "zebra" is not in the training vocabulary, so it reads as <unk>
    assert d.test.y[0, 2].item() == vocab.index("<unk>")


def test_ptb_errors(tmp_path):
    write_ptb(tmp_path)
    with pytest.raises(DataError, match="too few"):
        load_dataset(DataConfig(name="ptb", root=str(tmp_path), seq_len=50), seed=0)
    with pytest.raises(ConfigError, match="data.augment"):
        load_dataset(DataConfig(name="ptb", root=str(tmp_path), augment=True), seed=0)
    (tmp_path / "ptb.valid.txt").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="ptb", root=str(tmp_path)), seed=0)
    assert "'ptb.valid.txt' is missing" in one_line(err) and str(tmp_path) in str(err.value)


# --------------------------------------------------------------------------------------------- embedded


def test_digits_shapes_and_seeded_split():
    a = load_dataset(DataConfig(name="digits"), seed=0)
    b = load_dataset(DataConfig(name="digits"), seed=0)
    c = load_dataset(DataConfig(name="digits"), seed=1)
    assert a.input_shape == (1, 8, 8) and (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x[:50], c.train.x[:50])
    assert sum(a.info["sizes"].values()) == 1797
    flat = load_dataset(DataConfig(name="digits", flatten=True), seed=0)
    assert flat.input_shape == (64,) and torch.equal(flat.train.x, a.train.x.reshape(-1, 64))


def test_split_sizes_and_limits():
    d = load_dataset(DataConfig(name="digits", train_size=100, val_size=50, test_size=30), seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (100, 50, 30)
    assert load_dataset(DataConfig(name="digits", test_size=0), seed=0).test is None
    with pytest.raises(ConfigError, match="data.train_size"):
        load_dataset(DataConfig(name="digits", train_size=5000), seed=0)
    with pytest.raises(ConfigError, match="data.val_size"):
        load_dataset(DataConfig(name="digits", val_size=5000), seed=0)


def test_mnist1d_generated_offline_and_global_rng_untouched():
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    d = load_dataset(DataConfig(name="mnist1d", mnist1d_samples=200), seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert d.input_shape == (1, 40) and (len(d.train), len(d.val), len(d.test)) == (144, 16, 40)
    flat = load_dataset(DataConfig(name="mnist1d", mnist1d_samples=200, flatten=True), seed=0)
    assert flat.input_shape == (40,) and torch.equal(flat.train.x, d.train.x.reshape(-1, 40))


def test_synthetic_teacher_student_images():
    cfg = DataConfig(name="synthetic", input_shape=[3, 32, 32], n_samples=200, num_classes=4)
    a, b = load_dataset(cfg, seed=0), load_dataset(cfg, seed=0)
    assert a.input_shape == (3, 32, 32) and a.num_classes == 4
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert len(torch.unique(a.train.y)) == 4
    with pytest.raises(ConfigError, match="data.input_shape"):
        load_dataset(DataConfig(name="synthetic", input_shape=[]), seed=0)


def test_device_and_augment_flat_images_rejected():
    d = load_dataset(DataConfig(name="synthetic", n_samples=50), seed=0, device=torch.device("cpu"))
    assert d.train.x.device.type == "cpu" and d.train.y.dtype == torch.int64
    with pytest.raises(ConfigError, match="data.augment"):
        load_dataset(DataConfig(name="digits", flatten=True, augment=True), seed=0)


# ----------------------------------------------------------------------------------------- augmentation


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (6, 1, 8, 8), (6, 1, 40), (6, 40)])
def test_augment_deterministic_shape_preserving_and_changing(shape):
    x = torch.randn(shape)
    rng = torch.get_rng_state()
    a, b = augment_batch(x, _gen()), augment_batch(x, _gen())
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert not torch.equal(a, augment_batch(x, _gen(1)))


def test_augment_images_are_padded_crops_or_their_flips():
    x = torch.randn(8, 2, 8, 8)
    p = image_pad(8, 8)
    out = augment_batch(x, _gen(3))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        candidates = crops + [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_augment_signals_are_circular_shifts():
    x = torch.randn(10, 2, 40)
    out = augment_batch(x, _gen(4))
    for i in range(len(x)):
        shifts = range(-MAX_SIGNAL_SHIFT, MAX_SIGNAL_SHIFT + 1)
        assert any(torch.equal(out[i], torch.roll(x[i], s, dims=-1)) for s in shifts)
