"""Checkpoints: written atomically, read with ``weights_only=True`` (tensors and containers only)."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from sgdscope.errors import RunStoreError
from sgdscope.store import atomic_write_bytes

FORMAT = 2  # 2: the measurement state is the Scope's (format 1 kept probe and tracker states apart)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename: a crash leaves the old file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint; anything else (a foreign pickle, a truncated file) is a one-line RunStoreError."""
    if not path.is_file():
        raise RunStoreError(f"checkpoint: no file {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: one line on stderr only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not ours"
        text = str(err)
        if "Weights only load failed" in text:  # torch goes on to advise weights_only=False: never do that
            detail = re.search(r"Unsupported [^.\n]*", text)
            first = "it holds objects other than tensors and containers; refused by weights_only=True"
            first += f": {detail.group(0)}" if detail else ""
        else:
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
        raise RunStoreError(f"checkpoint: {path} is not a sgdscope checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunStoreError(f"checkpoint: {path} is not a sgdscope checkpoint (no 'model' state dict)")
    return state


def check_format(path: Path, state: dict[str, Any]) -> None:
    """A run checkpoint of this version (``start_from`` only needs the model weights)."""
    if state.get("format") != FORMAT:
        raise RunStoreError(f"checkpoint: {path} is not a sgdscope run checkpoint of this version "
                            f"(format {state.get('format')!r}, expected {FORMAT})")
