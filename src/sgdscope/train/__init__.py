"""The config-driven application: build a run from its config (build), train it (loop), checkpoint it
(checkpoint) and run its life from validation to status (lifecycle). It measures only through a Scope."""

from sgdscope.train.build import BatchStream, resolve_device
from sgdscope.train.lifecycle import run
from sgdscope.train.loop import Trainer

__all__ = ["BatchStream", "Trainer", "resolve_device", "run"]
