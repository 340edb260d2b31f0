"""Small readers for the standard dataset files: CIFAR python pickles, MNIST idx, Tiny ImageNet, PTB text.

Each reader validates what it reads; any missing, truncated or malformed file becomes a one-line
:class:`~sgdscope.errors.DataError` that names the file, where it was expected and its format.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdscope.config import DataConfig
from sgdscope.data.core import Source
from sgdscope.errors import ConfigError, DataError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise DataError(f"{cfg.name}: data.root is not set; set data.root to the folder holding {what}")
    return Path(cfg.root).expanduser()


def _locate(root: Path, subdirs: tuple[str, ...], marker: str) -> Path:
    """The first of ``root/sub`` holding ``marker``; else where it is expected first (for the error message)."""
    for sub in subdirs:
        if (root / sub / marker).exists():
            return root / sub
    return root / subdirs[0]


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------------ CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and numpy arrays only: any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load the global {module}.{name}") from None


_CIFAR = {
    "cifar10": {
        "dirs": ("cifar-10-batches-py", "."),
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "labels": "labels",
        "classes": 10,
        "what": "the python pickle batches 'data_batch_1'..'data_batch_5' and 'test_batch'",
        "archive": "cifar-10-python.tar.gz",
    },
    "cifar100": {
        "dirs": ("cifar-100-python", "."),
        "train": ("train",),
        "test": ("test",),
        "labels": "fine_labels",
        "classes": 100,
        "what": "the python pickles 'train' and 'test' (with 'fine_labels')",
        "archive": "cifar-100-python.tar.gz",
    },
}


def _cifar_batch(path: Path, spec: dict, name: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    def bad(why: str) -> DataError:
        return DataError(f"{name}: {path} is not a valid CIFAR python pickle batch ({why}); {hint}")

    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle can fail in many ways inside the unpickler
        raise bad(_reason(err)) from None
    if not isinstance(obj, dict):
        raise bad(f"holds a {type(obj).__name__}, not a dict")

    def get(key: str) -> Any:
        for k in (key, key.encode()):
            if k in obj:
                return obj[k]
        raise bad(f"no {key!r} entry")

    data, labels = get("data"), np.asarray(get(spec["labels"]))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise bad("'data' must be a uint8 array of shape (N, 3072)")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise bad(f"{spec['labels']!r} must hold {len(data)} integer labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec["classes"]):
        raise bad(f"labels outside 0..{spec['classes'] - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(cfg: DataConfig) -> Source:
    """CIFAR-10 / CIFAR-100 from the python pickle batches (``uint8`` (N, 3, 32, 32), scale 1/255).

    Only the expected files are unpickled, with an unpickler that accepts numpy arrays and builtin
    containers and nothing else; keys may be ``str`` or ``bytes`` (the originals are Python 2 pickles).
    """
    spec = _CIFAR[cfg.name]
    root = _require_root(cfg, spec["what"])
    where = _locate(root, spec["dirs"], spec["train"][0])
    hint = f"download {spec['archive']} and extract it in {root}"
    parts = {}
    for split in ("train", "test"):
        batches = []
        for fname in spec[split]:
            path = where / fname
            if not path.is_file():
                raise DataError(f"{cfg.name}: expected {spec['what']} in {where}; {fname!r} is missing ({hint})")
            batches.append(_cifar_batch(path, spec, cfg.name, hint))
        parts[split] = [torch.from_numpy(np.concatenate(a)) for a in zip(*batches)]
    files = [str(where / f) for f in spec["train"] + spec["test"]]
    (x, y), (xt, yt) = parts["train"], parts["test"]
    return Source(x, y, spec["classes"], xt, yt, scale=1 / 255, info={"source": "files", "files": files})


# ------------------------------------------------------------------------------------------------- idx

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DIRS = {"mnist": (".", "MNIST/raw"), "fashion_mnist": (".", "FashionMNIST/raw")}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (optionally gzipped) with ``ndim`` dimensions.

    The format: two zero bytes, the type code 0x08 (ubyte), the number of dimensions, then one big-endian
    uint32 per dimension and the data; the magic number is thus ``0x0000080N``. Raises ValueError when the
    header or the length does not match.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = 0x00000800 + ndim
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"only {len(raw)} bytes, shorter than the header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(f"magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{len(raw)} bytes where the header {dims} implies {expected} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_mnist(cfg: DataConfig) -> Source:
    """MNIST / Fashion-MNIST from the four idx files (each plain or ``.gz``) as (1, 28, 28) ``uint8`` images."""
    names = [n for pair in _IDX_FILES.values() for n in pair]
    what = "the idx files " + ", ".join(repr(n) for n in names) + " (each optionally .gz)"
    root = _require_root(cfg, what)
    where = root
    for sub in _IDX_DIRS[cfg.name]:
        if any((root / sub / (names[0] + ext)).is_file() for ext in ("", ".gz")):
            where = root / sub
            break

    def load(fname: str, ndim: int) -> tuple[np.ndarray, Path]:
        for path in (where / fname, where / (fname + ".gz")):
            if path.is_file():
                try:
                    return read_idx(path, ndim), path
                except (OSError, EOFError, ValueError, zlib.error) as err:
                    why = _reason(err)
                    raise DataError(f"{cfg.name}: {path} is not a valid idx{ndim} ubyte file ({why})") from None
        raise DataError(f"{cfg.name}: expected {what} in {where}; {fname!r} is missing")

    parts, files = {}, []
    for split, (img_name, lbl_name) in _IDX_FILES.items():
        (x, px), (y, py) = load(img_name, 3), load(lbl_name, 1)
        files += [str(px), str(py)]
        if len(x) != len(y):
            raise DataError(f"{cfg.name}: {px} holds {len(x)} images but {py} holds {len(y)} labels")
        if len(y) and y.max() >= 10:
            raise DataError(f"{cfg.name}: {py} holds labels outside 0..9")
        parts[split] = torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    (x, y), (xt, yt) = parts["train"], parts["test"]
    if x.shape[1:] != xt.shape[1:]:
        raise DataError(f"{cfg.name}: train images are {tuple(x.shape[2:])} but test images {tuple(xt.shape[2:])}")
    return Source(x, y, 10, xt, yt, scale=1 / 255, info={"source": "files", "files": files})


# ---------------------------------------------------------------------------------------- Tiny ImageNet

_TINY_WHAT = (
    "the tiny-imagenet-200 folder (wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt, val/images/)"
)
_JPEG_SUFFIXES = {".jpeg", ".jpg"}


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"tiny_imagenet: expected the JPEG image {path} ({_TINY_WHAT})")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged images
        raise DataError(f"tiny_imagenet: {path} is not a readable JPEG image ({_reason(err)})") from None


def _stack_images(paths: list[Path]) -> torch.Tensor:
    images = [_read_image(p) for p in paths]
    size = "×".join(map(str, images[0].shape[1:]))
    for p, im in zip(paths, images):
        if im.shape != images[0].shape:
            raise DataError(f"tiny_imagenet: {p} is {im.shape[1]}×{im.shape[2]}, unlike {paths[0]} ({size})")
    return torch.from_numpy(np.stack(images))


def read_tiny_imagenet(cfg: DataConfig) -> Source:
    """Tiny ImageNet (``uint8`` (3, 64, 64)); classes are the sorted wnids, so labels match ImageFolder's.

    ``tiny_classes`` keeps the first classes of that order, ``tiny_per_class`` the first training images
    (sorted by name) of each; the official validation images of the kept classes form the test set (the
    official test images carry no labels).
    """
    root = _require_root(cfg, _TINY_WHAT)
    where = _locate(root, ("tiny-imagenet-200", "."), "wnids.txt")
    wnids_file = where / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"tiny_imagenet: expected {_TINY_WHAT} in {where}; 'wnids.txt' is missing")
    wnids = sorted({w.strip() for w in wnids_file.read_text(encoding="utf-8", errors="replace").split() if w.strip()})
    if not wnids:
        raise DataError(f"tiny_imagenet: {wnids_file} lists no classes (one wnid per line expected)")
    if cfg.tiny_classes is not None:
        if cfg.tiny_classes > len(wnids):
            raise ConfigError(f"data.tiny_classes: {cfg.tiny_classes} exceeds the {len(wnids)} classes in {wnids_file}")
        wnids = wnids[: cfg.tiny_classes]
    label = {w: i for i, w in enumerate(wnids)}

    paths, labels = [], []
    for w in wnids:
        folder = where / "train" / w / "images"
        images = sorted(p for p in folder.glob("*") if p.suffix.lower() in _JPEG_SUFFIXES) if folder.is_dir() else []
        if not images:
            raise DataError(f"tiny_imagenet: expected JPEG training images in {folder} (layout {_TINY_WHAT})")
        images = images[: cfg.tiny_per_class]
        paths += images
        labels += [label[w]] * len(images)

    ann = where / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"tiny_imagenet: expected {_TINY_WHAT} in {where}; {str(ann.relative_to(where))!r} is missing")
    test_paths, test_labels = [], []
    for n, line in enumerate(ann.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"tiny_imagenet: {ann} line {n} is not 'file<TAB>wnid<TAB>...'")
        if fields[1] in label:
            test_paths.append(where / "val" / "images" / fields[0])
            test_labels.append(label[fields[1]])
    if not test_paths:
        raise DataError(f"tiny_imagenet: {ann} lists no image of the {len(wnids)} selected classes")
    x, xt = _stack_images(paths), _stack_images(test_paths)
    if xt.shape[1:] != x.shape[1:]:
        raise DataError(
            f"tiny_imagenet: validation images are {tuple(xt.shape[2:])} but training images {tuple(x.shape[2:])}"
        )
    info = {
        "source": "files",
        "files": [str(wnids_file), str(ann)],
        "classes": wnids,
        "n_image_files": len(paths) + len(test_paths),
    }
    return Source(x, torch.tensor(labels), len(wnids), xt, torch.tensor(test_labels), scale=1 / 255, info=info)


# ------------------------------------------------------------------------------------------------- PTB

PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}
_PTB_WHAT = "the text files 'ptb.train.txt', 'ptb.valid.txt' and 'ptb.test.txt'"


def _ptb_words(path: Path, where: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"ptb: expected {_PTB_WHAT} in {where}; {path.name!r} is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"ptb: {path} is not a UTF-8 text file ({_reason(err)})") from None
    return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


def read_ptb(cfg: DataConfig) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """Penn Treebank as three int64 token streams, with ``<eos>`` ending every line.

    The vocabulary is the training file's words ordered by decreasing count, ties alphabetically; a word
    of the validation or test file outside it becomes ``<unk>`` (PTB already maps rare words to it).
    Returns the streams keyed train/val/test, the vocabulary size and provenance.
    """
    root = _require_root(cfg, _PTB_WHAT)
    where = _locate(root, (".", "data", "simple-examples/data"), PTB_FILES["train"])
    words = {k: _ptb_words(where / f, where) for k, f in PTB_FILES.items()}
    counts = Counter(words["train"])
    vocab = {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}
    unk = vocab.get("<unk>")
    streams = {}
    for key, ws in words.items():
        path = where / PTB_FILES[key]
        try:
            ids = [vocab[w] if unk is None else vocab.get(w, unk) for w in ws]
        except KeyError as err:
            raise DataError(
                f"ptb: {path} has the word {err.args[0]!r}, absent from the training vocabulary, and no '<unk>'"
            ) from None
        if len(ids) < cfg.seq_len + 1:
            raise DataError(
                f"ptb: {path} holds {len(ids)} tokens, too few for one sequence of data.seq_len={cfg.seq_len}"
            )
        streams[key] = torch.tensor(ids, dtype=torch.int64)
    info = {
        "source": "files",
        "files": [str(where / f) for f in PTB_FILES.values()],
        "vocab_size": len(vocab),
        "tokens": {k: len(v) for k, v in streams.items()},
    }
    return streams, len(vocab), info
