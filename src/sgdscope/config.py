"""The run and sweep configuration: pydantic models, YAML loading and ``--set a.b=c`` overrides.

Every error is turned into a one-line :class:`~sgdscope.errors.ConfigError` that names the field and
what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from sgdscope.errors import ConfigError, format_validation_error
from sgdscope.measure.options import (  # noqa: F401 - the probe options are part of the run config
    AlignmentProbe,
    AlphaStepProbe,
    DirectionProbe,
    EigenProbe,
    InterpolationProbe,
    ProbesOptions as ProbesConfig,
)

Every = Union[Literal["epoch"], int]


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number (YAML's .nan, .inf, 1e400) is never a meaningful setting,
    # and would pass range checks such as lr > 0 only to surface as a silently wrong run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# datasets read from files; each has a synthetic stand-in of its shape (data.synthetic, data/standin.py)
FILE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "tiny_imagenet", "ptb")


class DataConfig(_Strict):
    name: Literal[
        "digits", "mnist1d", "synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist", "tiny_imagenet", "ptb"
    ] = "digits"
    root: Optional[str] = None
    # true: a synthetic stand-in of the named file dataset's exact shape, sizes and classes, and no file read
    # (data/standin.py), so a paper-size config runs where the real files are absent; recorded in config.yaml
    synthetic: bool = False
    train_size: Optional[int] = Field(None, gt=0)
    val_size: Optional[int] = Field(None, ge=0)
    test_size: Optional[int] = Field(None, ge=0)
    augment: bool = False
    flatten: bool = False  # images as flat vectors (for MLPs)
    # synthetic teacher-student set
    n_samples: int = Field(2000, gt=0)
    input_shape: list[int] = Field(default_factory=lambda: [20])
    num_classes: int = Field(10, ge=2)
    # mnist1d
    mnist1d_samples: int = Field(5000, gt=0)
    # ptb
    seq_len: int = Field(20, gt=0)
    # tiny-imagenet subset
    tiny_classes: Optional[int] = Field(None, gt=0)
    tiny_per_class: Optional[int] = Field(None, gt=0)

    @field_validator("synthetic")
    @classmethod
    def _standin(cls, v: bool, info: ValidationInfo) -> bool:
        name = info.data.get("name")  # declared before, so already validated (absent if it was invalid)
        if v and name is not None and name not in FILE_DATASETS:
            raise ValueError(f"{name} is embedded or generated and needs no stand-in; synthetic stand-ins exist "
                             f"for {', '.join(FILE_DATASETS)}")
        return v


class ModelConfig(_Strict):
    name: Literal["mlp", "simplecnn", "vgg11", "resnet32", "resnet56", "lstm"] = "mlp"
    batchnorm: bool = False
    widths: list[int] = Field(default_factory=lambda: [100, 100])  # mlp hidden widths
    filters: Optional[list[int]] = None  # simplecnn; default per variant
    kernel_size: Optional[int] = Field(None, gt=0)  # simplecnn; default per variant
    padding: Literal["same", "valid"] = "same"  # simplecnn conv2/conv4: paper 'same', released code 'valid'
    variant: Literal["standard", "medium"] = "standard"
    width_factor: float = Field(1.0, gt=0)  # scales channels of simplecnn / vgg / resnet for CPU-sized runs
    blocks_per_stage: Optional[int] = Field(None, gt=0)  # resnet override (32 -> 5, 56 -> 9)
    dropout: float = Field(0.0, ge=0, lt=1)
    hidden: int = Field(200, gt=0)  # lstm
    layers: int = Field(2, gt=0)  # lstm
    embed: int = Field(200, gt=0)  # lstm


class OptimizerConfig(_Strict):
    # adam: torch.optim.Adam with its own weight_decay 0; optimizer.weight_decay stays the explicit L2 term
    # λ·Σw² of the loss for every optimizer, so adam with weight_decay > 0 is L2-regularised Adam (the
    # gradient it preconditions includes 2λθ, and the measured Hessian the 2λI), not AdamW's decoupled decay
    name: Literal["sgd", "nsgd", "gd", "noisy_gd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(128, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0)
    k: int = Field(5, gt=0)
    mode: Literal["scale", "only", "remove", "fixed"] = "scale"
    refresh: Every = "epoch"  # nsgd: how often U is recomputed
    freeze_subspace: bool = False  # nsgd: keep the first U (with mode=only and k=1: "SGD constant top")
    nudge_from: int = Field(0, ge=0)  # nsgd: plain SGD before this step, so variants share one start point
    noise_factor: float = Field(0.0, ge=0)
    noise_scales: Literal["std", "variance"] = "std"  # code used std; paper says variance
    gd_chunk: int = Field(1000, gt=0)  # gd / noisy_gd: examples per chunk (exactly weighted)
    betas: tuple[float, float] = (0.9, 0.999)  # adam: (β₁, β₂), each in [0, 1)
    eps: float = Field(1e-8, gt=0)  # adam: ε of the denominator √v̂ + ε

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("must be two numbers (β₁, β₂), each in [0, 1)")
        return v

    @model_validator(mode="after")
    def _adam(self) -> "OptimizerConfig":
        if self.name == "adam" and self.momentum != 0:
            raise ValueError("momentum: adam takes no momentum key; its momentum is β₁ = optimizer.betas[0]")
        return self


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cyclic", "trapezoid", "plateau"] = "constant"
    # step: lr * factor^(number of milestones passed); milestones in epochs
    milestones: list[float] = Field(default_factory=list)
    factor: float = Field(0.1, gt=0)
    # cyclic (triangular CLR) and trapezoid; in steps
    base_lr: Optional[float] = Field(None, gt=0)
    max_lr: Optional[float] = Field(None, gt=0)
    step_size: int = Field(100, gt=0)
    t_up: int = Field(100, ge=0)
    t_flat: int = Field(100, ge=0)
    t_down: int = Field(100, gt=0)
    # plateau
    monitor: Literal["val_loss", "val_acc", "train_loss", "train_acc"] = "val_loss"
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0)
    threshold_mode: Literal["abs", "rel"] = "abs"  # abs: Keras ReduceLROnPlateau (the NSGD code); rel: torch's
    min_lr: float = Field(0.0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(m < 0 for m in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be an increasing list of non-negative epochs")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(10, gt=0)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"  # mse: ½‖f(x) − onehot(y)‖², as edge-of-stability studies use
    # diverged once the batch loss passes factor·max(first loss, 1) or ‖θ‖ passes factor·max(‖θ_0‖, 1); null: never
    divergence_factor: Optional[float] = Field(1e3, gt=1)
    epoch_size: Optional[int] = Field(None, gt=0)  # examples per "epoch" (the papers' zoom)
    eval_batch_size: int = Field(1000, gt=0)
    checkpoint_every: Every = "epoch"
    early_stop_patience: Optional[int] = Field(None, gt=0)  # epochs without val-acc improvement


class MeasureConfig(_Strict):
    subset: float = Field(0.05, gt=0, le=1)
    min_subset: int = Field(1000, ge=1)
    bn_policy: Literal["eval", "train-restore", "train"] = "train-restore"
    batch_size: int = Field(1000, gt=0)
    include_l2: bool = True


SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0..2^64-1; past it, it overflows


class RunConfig(_Strict):
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    on_nan: Literal["stop", "skip"] = "stop"
    tensorboard: bool = False
    start_from: Optional[str] = None  # a checkpoint (.pt) whose model weights start this run

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        if self.optimizer.name == "nsgd" and self.probes.eigen is not None and self.probes.eigen.k < self.optimizer.k:
            raise ValueError(f"optimizer.k ({self.optimizer.k}) must be <= probes.eigen.k ({self.probes.eigen.k})")
        return self


# ----------------------------------------------------------------------------------------------- parsing


def _key(p: Any) -> str:
    """A key as shown in a message: itself, or its repr when it would break the one-line message."""
    return str(p) if str(p).isprintable() else repr(p)


def _format_error(err: ValidationError) -> str:
    return format_validation_error(err)


def validate(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; errors become one-line ConfigErrors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` or of a ``--grid`` entry as YAML (so ``0.1``, ``true``,
    ``[1, 2]`` and ``null`` work). YAML 1.1 reads ``1e-3`` (an exponent without a dot) as a string; such
    text is a number here.

    >>> parse_value("1e-3"), parse_value("[64, 64]"), parse_value("sgd")
    (0.001, [64, 64], 'sgd')
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def set_dotted(raw: dict[str, Any], key: str, value: Any, option: str = "--set") -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections (in place)."""
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{option} {_key(key)}: {p!r} is not a section")
        node = nxt
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, for example optimizer.lr=0.05")
        key, value = item.split("=", 1)
        set_dotted(raw, key, parse_value(value))
    return raw


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML document names the same key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping, where SafeLoader keeps the last silently
    (so a second ``lr:`` would quietly override the first). Keys brought in by a ``<<`` merge may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first at line {seen[key]}); "
                                            "keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
        return super().construct_mapping(node, deep=deep)


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (ConfigError if absent, not YAML, or a key is repeated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: no such file {str(p)!r}; give a YAML file or a recipe name (see `sgdscope recipes`)")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8", errors="strict"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"config: {p}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config: {p} is not valid YAML ({first})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {p} must hold a mapping of keys to values")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (or defaults when ``path`` is None), apply ``--set`` overrides and validate."""
    raw = load_raw(path) if path is not None else {}
    return validate(apply_overrides(raw, list(overrides or [])))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The fully resolved config as plain YAML-able data."""
    return cfg.model_dump(mode="json")
