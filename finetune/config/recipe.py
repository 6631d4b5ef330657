"""Recipe: the typed, validated description of one fine-tuning run, read from YAML.

Each section is a dataclass; unknown keys and wrong types are rejected with the key's dotted
name, and ``--set data.batch_size=16`` style overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from finetune.errors import FinetuneError
from finetune.config.recipe_library import find_recipe

__all__ = [
    "METRICS",
    "MONITORS",
    "MULTILABEL_METRICS",
    "lower_is_better",
    "is_better",
    "worst_value",
    "MAX_RECIPE_NODES",
    "read_yaml",
    "flatten",
    "LOGGERS",
    "DataConfig",
    "HeadConfig",
    "ModelConfig",
    "AugmentConfig",
    "TrainConfig",
    "SemiConfig",
    "Recipe",
    "load_recipe",
    "apply_overrides",
    "resolve_recipe",
]

LAYOUTS = ("auto", "folder", "filename", "csv", "shards")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
BN_POLICIES = ("frozen", "train", "fixed")
POOLS = ("avg", "max", "avgmax", "catavgmax")
BALANCE = ("none", "sampler", "loss")
POLICIES = ("none", "randaugment", "trivialaugment")
PRESETS = ("none", "light", "medium", "heavy", "hw03")  # built in finetune/data/transforms.py
# Every metric a run can be judged by, and which way is better: declared here only (train.monitor, best.pt,
# early stopping, tuning direction and the runs table all read it).
METRICS: dict[str, str] = {"val_acc": "max", "val_loss": "min", "val_map": "max", "val_f1": "max"}
MONITORS = tuple(METRICS)  # the choices of train.monitor
MULTILABEL_METRICS = ("val_map", "val_f1")  # data.task multilabel only
TASKS = ("single", "multilabel")
# logits → probabilities per task: the one task fact inference needs (finetune.tasks holds the rest)
TASK_ACTIVATIONS = {"single": "softmax", "multilabel": "sigmoid"}
# Above this a single 32-image float batch is over 1.6 GB before the network sees it, and no pretrained
# backbone was trained near it (224-600 px); larger images are downscaled to data.image_size anyway.
MAX_IMAGE_SIZE = 2048
LOGGERS = ("csv", "tensorboard", "mlflow")  # built in finetune/outputs/loggers.py
IMAGE_CACHES = ("none", "disk", "ram")  # built in finetune/data/cache.py
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast dtypes, finetune/engine/step.py


# A recipe is a few dozen settings; more values than this after expanding YAML aliases is an alias bomb
# (nested anchors that expand exponentially), refused before anything is built from it.
MAX_RECIPE_NODES = 10_000
_SHOWN = 60  # characters of a value an error message quotes


def lower_is_better(metric: str) -> bool:
    """True for metrics that improve downwards (val_loss); raises for a name that is no metric."""
    if metric not in METRICS:
        raise FinetuneError(f"unknown metric {_show(metric)}; metrics: {', '.join(METRICS)}")
    return METRICS[metric] == "min"


def is_better(metric: str, new: float, old: float) -> bool:
    """Whether `new` is strictly better than `old` by `metric`'s direction."""
    return new < old if lower_is_better(metric) else new > old


def worst_value(metric: str) -> float:
    """The value every real result beats: +inf for a metric to minimise, -inf for one to maximise."""
    return math.inf if lower_is_better(metric) else -math.inf


def _show(value: Any) -> str:
    """`value` as an error message quotes it: its repr on one line, cut to a few dozen characters with …."""
    text = " ".join(repr(value).split())
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise FinetuneError(f"recipe key '{key}' is {_show(value)}; valid choices: {', '.join(map(str, choices))}")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys and alias expansions beyond MAX_RECIPE_NODES."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) → values it stands for, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        node = super().compose_node(parent, index)
        if id(node) not in self._sizes:  # an alias returns its anchor's node, already counted
            children: list = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
            if size > MAX_RECIPE_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases expand to more than {MAX_RECIPE_NODES} values (an alias bomb?); "
                    "write the values out instead of nesting anchors", node.start_mark)
            self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}  # (tag, text): `1` and `"1"` are different keys
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges: its keys may be overridden on purpose
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_show(key_node.value)} appears twice (first on line {seen[key]}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def read_yaml(text: str) -> Any:
    """Parse recipe YAML safely: no duplicate keys, alias expansion bounded by MAX_RECIPE_NODES."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclass
class DataConfig:
    """Where the images are and how labels are read from them."""

    root: Optional[str] = None  # dataset folder; `--data DIR` overrides it
    task: str = "single"  # single (one label per image) | multilabel (several per image; needs layout: csv)
    layout: str = "auto"  # auto | folder (train/<class>/) | filename (3_120.jpg) | csv (manifest) | shards
    train: str = "auto"  # sub-folder holding training images ("auto": train/ or training/, else root)
    val: Optional[str] = "auto"  # sub-folder with validation images; "auto" finds val/validation/valid
    test: Optional[str] = "auto"  # unlabeled test folder; k-fold names it in the predict command it prints
    # Images without labels, any depth ("auto": training/unlabeled/ or unlabeled/; null = none); a `semi:`
    # section and `finetune pseudo-label` use them. With "auto", training/labeled/<class>/ is the training data.
    unlabeled: Optional[str] = "auto"
    label_regex: str = r"^(\d+)_"  # filename layout: first group of this regex is the label
    csv: Optional[str] = None  # csv layout: manifest file with columns path|id and label
    csv_image_dir: Optional[str] = None  # csv layout: folder the ids/paths are relative to
    csv_id_column: Optional[str] = None  # csv layout: column holding the path or id (default: first)
    csv_label_column: Optional[str] = None  # csv layout: column holding the label (default: second)
    # multilabel: what separates the labels in the label column (None: any of space, comma, |); without
    # csv_label_column, a manifest whose other columns all hold 0/1 is read as one column per class.
    csv_label_sep: Optional[str] = None
    # A CSV of images to leave out of training and validation (first column or `path`: paths, absolute or relative
    # to the data folder), e.g. the excluded.csv of `finetune audit`, edited; listed in skipped_images.csv.
    exclude: Optional[str] = None
    val_fraction: float = 0.2  # stratified hold-out when no validation folder exists
    image_size: Optional[int] = None  # training/eval size; None = the backbone's pretrained size
    # Evaluation framing: resize the shorter side to image_size / crop_pct, then centre-crop image_size.
    # None = the backbone's pretrained value (e.g. 0.875); 1.0 = the whole image, nothing cut off (objects
    # that fill the frame: product shots, scans, Fashion-MNIST). Stored in the checkpoint: predict follows it.
    crop_pct: Optional[float] = None
    batch_size: int = 32
    # DataLoader worker processes per training process; None = the core budget's choice (finetune/data/cores.py:
    # 1 beside the model on a CPU with 2+ cores, 0 on 1 core), printed at the start of the run. 0 = the main process.
    num_workers: Optional[int] = None
    balance: str = "none"  # none | sampler (weighted sampling) | loss (class-weighted loss)
    # Pre-resized image cache: none | ram (decoded once into shared memory, for folders that fit in RAM) |
    # disk (one file per image in cache_dir, reused across runs; a changed image is decoded again).
    cache: str = "none"
    cache_dir: Optional[str] = None  # data.cache: disk folder; None = ~/.cache/finetune/images

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range or conflicting settings, naming the recipe key."""
        _choice("data.layout", self.layout, LAYOUTS)
        _choice("data.cache", self.cache, IMAGE_CACHES)
        _choice("data.balance", self.balance, BALANCE)
        _choice("data.task", self.task, TASKS)
        if self.task == "multilabel" and self.layout not in ("csv", "shards"):
            raise FinetuneError("data.task is 'multilabel' but data.layout is not 'csv': several labels per image "
                                "come from a CSV manifest (set data.layout: csv and data.csv: labels.csv)")
        if self.csv_label_sep is not None and not self.csv_label_sep:
            raise FinetuneError("recipe key 'data.csv_label_sep' must be a non-empty separator, e.g. ' ' or '|'")
        if not 0.0 < self.val_fraction < 1.0:
            raise FinetuneError("recipe key 'data.val_fraction' must be between 0 and 1 (e.g. 0.2)")
        if self.batch_size < 1:
            raise FinetuneError("recipe key 'data.batch_size' must be at least 1")
        if self.crop_pct is not None and not 0.5 <= self.crop_pct <= 1.0:
            raise FinetuneError(f"recipe key 'data.crop_pct' is {self.crop_pct}; it must be between 0.5 and 1.0 "
                                "(1.0 keeps the whole image, 0.875 cuts 1/16 off each side)")
        if self.num_workers is not None and self.num_workers < 0:
            raise FinetuneError(f"recipe key 'data.num_workers' is {self.num_workers}; it must be 0 (load in the main "
                                "process) or more, or null to let the core budget choose")
        if self.image_size is not None and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise FinetuneError(
                f"recipe key 'data.image_size' is {self.image_size}; it must be between 8 and {MAX_IMAGE_SIZE} "
                "pixels (pretrained backbones use 224-600; larger inputs exhaust memory without gaining accuracy)"
            )
        if self.layout == "shards" and self.exclude:
            raise FinetuneError("data.exclude lists image files; with data.layout: shards leave the images out when "
                                "writing the shards (finetune datasets shard with --set data.exclude=FILE)")
        if self.layout == "csv" and not self.csv:
            raise FinetuneError("data.layout is 'csv' but 'data.csv' (the manifest file) is not set")


@dataclass
class HeadConfig:
    """The MLP that replaces the backbone's classifier."""

    hidden: list[int] = field(default_factory=list)  # e.g. [1024, 512]; [] = a single Linear layer
    dropout: float = 0.2  # dropout before each Linear layer of the MLP
    batchnorm: bool = True  # BatchNorm1d after each hidden Linear layer
    pool: str = "avg"  # global pooling of the feature map: avg | max | avgmax | catavgmax (lenet has none)

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range or conflicting settings, naming the recipe key."""
        _choice("model.head.pool", self.pool, POOLS)
        if not 0.0 <= self.dropout < 1.0:
            raise FinetuneError("recipe key 'model.head.dropout' must be in [0, 1)")
        if any(h < 1 for h in self.hidden):
            raise FinetuneError("recipe key 'model.head.hidden' must list positive layer widths")


@dataclass
class ModelConfig:
    """Which backbone, which weights, and what is trained."""

    backbone: str = "resnet18"  # timm name, `tv/<name>` for torchvision, or a classic (lenet, nin, hw03net)
    pretrained: bool = False  # download pretrained weights from the hub (needs network)
    weights: Optional[str] = None  # local weights file: a state dict or a finetune checkpoint
    trainable: Optional[list[str]] = None  # stages/modules left trainable ([] = head only); None = everything
    trainable_last: Optional[int] = None  # train only the last N backbone stages (0 = head only)
    freeze_to: Optional[str] = None  # freeze every stage up to and including this one (`finetune inspect`)
    # BatchNorm statistics: frozen (eval in frozen stages) | train (batch stats everywhere) | fixed (eval in the
    # whole backbone, the pretrained statistics kept even where the stage trains)
    bn: str = "frozen"
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range or conflicting settings, naming the recipe key."""
        _choice("model.bn", self.bn, BN_POLICIES)
        if self.pretrained and self.weights:
            raise FinetuneError("set either 'model.pretrained: true' or 'model.weights: PATH', not both")
        chosen = [k for k in ("trainable", "trainable_last", "freeze_to") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise FinetuneError(
                f"set only one of model.trainable, model.trainable_last, model.freeze_to (got {', '.join(chosen)})"
            )
        if self.trainable_last is not None and self.trainable_last < 0:
            raise FinetuneError("recipe key 'model.trainable_last' must be 0 (head only) or more")
        self.head.validate()


@dataclass
class AugmentConfig:
    """Training augmentation (albumentations)."""

    preset: str = "light"  # none | light | medium | heavy | hw03
    ops: Optional[list[dict]] = None  # explicit albumentations list, e.g. [{name: HorizontalFlip, p: 0.5}]
    policy: str = "none"  # none | randaugment | trivialaugment (torchvision), after the preset's crop
    mixup: float = 0.0  # mixup Beta(alpha, alpha) per batch, e.g. 0.2; 0 = off
    cutmix: float = 0.0  # cutmix Beta(alpha, alpha) per batch, e.g. 1.0; 0 = off (both on: one per batch)
    mix_prob: float = 1.0  # chance that a batch is mixed when mixup or cutmix is on

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range or conflicting settings, naming the recipe key."""
        _choice("augment.preset", self.preset, PRESETS)
        _choice("augment.policy", self.policy, POLICIES)
        if self.mixup < 0 or self.cutmix < 0:
            raise FinetuneError("recipe keys 'augment.mixup' and 'augment.cutmix' are Beta alphas: 0 (off) or "
                                "positive, e.g. mixup: 0.2, cutmix: 1.0")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise FinetuneError("recipe key 'augment.mix_prob' must be between 0 and 1")


@dataclass
class TrainConfig:
    """Optimisation and the loop."""

    epochs: int = 10
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | constant (after warmup)
    warmup_epochs: float = 0.0  # linear warm-up; more than train.epochs is clamped to the whole run
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max gradient norm; None = no clipping
    amp: bool = True  # fp16 mixed precision when running on CUDA (train.precision: fp32 turns it off too)
    # Autocast precision: fp32 (none) | bf16 (CPU and CUDA; faster inference, often slower CPU training) |
    # fp16 (CUDA only, with a gradient scaler). None = fp16 on CUDA when train.amp, else fp32.
    precision: Optional[str] = None
    compile: bool = False  # torch.compile the model; falls back to eager with one warning where it fails
    # Head-only training on cached backbone features: computed once, then only the head runs per epoch.
    # auto: when only the head trains and the augmentation is deterministic (augment.preset none, no policy,
    # no mixup/cutmix); true: also with random augmentation (features of un-augmented images); false: never.
    cache_features: Optional[bool] = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Intra-op threads for the model (torch.set_num_threads); None = the core budget's choice: the cores this process
    # may use (affinity, cgroup quota, shared among torchrun's local processes) less those the loader needs.
    threads: Optional[int] = None
    channels_last: bool = True  # faster convolutions on CPU and GPU
    # Seconds between progress lines (step, images/s, time left) when the log is not a terminal; 0 = none.
    progress_every: float = 60.0
    accumulate: int = 1  # optimiser step every N batches (effective batch = N x data.batch_size)
    ema: bool = False  # keep an exponential moving average of the weights; evaluate and save it
    ema_decay: float = 0.999  # EMA decay per optimiser step (warmed up from 0 over the first steps)
    patience: Optional[int] = None  # stop after N epochs without improvement of `monitor`; None = never
    monitor: str = "val_acc"  # val_acc | val_loss | val_map | val_f1 (multilabel): decides best.pt, early stopping
    lr_mult: Optional[dict[str, float]] = None  # learning-rate multiplier per stage, e.g. {layer4: 0.1}
    layer_decay: Optional[float] = None  # lr × decay^k for the stage k steps below the head (e.g. 0.7)
    unfreeze: Optional[dict[int, list[str]]] = None  # gradual unfreezing: {epoch: [stages]}, e.g. {3: [layer3]}
    fine_tune: Optional[int] = None  # fastai-style: N head-only epochs, then the body too (same lr unless layer_decay)
    # Under torchrun (several processes, data.batch_size each): BatchNorm statistics over the global batch
    # instead of each process's share (PyTorch's SyncBatchNorm; CUDA only). Matters with small per-device batches.
    sync_bn: bool = False
    # Where each epoch's row goes: csv (history.csv, always written: resume, reports and `finetune runs` read it),
    # tensorboard, mlflow (optional extras of the same names).
    loggers: list[str] = field(default_factory=lambda: ["csv"])

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range or conflicting settings, naming the recipe key."""
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        if self.epochs < 1:
            raise FinetuneError("recipe key 'train.epochs' must be at least 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise FinetuneError(f"recipe key 'train.lr' is {_show(self.lr)}; it must be a positive finite number, "
                                "e.g. 1e-3")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FinetuneError("recipe key 'train.label_smoothing' must be in [0, 1)")
        if not math.isfinite(self.warmup_epochs) or self.warmup_epochs < 0:
            raise FinetuneError(f"recipe key 'train.warmup_epochs' is {self.warmup_epochs:g}; it must be 0 (no "
                                "warm-up) or more, e.g. 1")
        # A shipped recipe's warm-up must not refuse a shorter run (--set train.epochs=1): the warm-up then
        # spans the whole run, its rate reaching train.lr on the last step.
        self.warmup_epochs = min(self.warmup_epochs, float(self.epochs))
        if not 0 <= self.seed < 2**32:
            raise FinetuneError(f"recipe key 'train.seed' is {_show(self.seed)}; it must be between 0 and "
                                f"{2**32 - 1} (numpy's seed range), e.g. 0")
        _choice("train.monitor", self.monitor, MONITORS)
        if self.precision is not None:
            _choice("train.precision", self.precision, PRECISIONS)
        if self.accumulate < 1:
            raise FinetuneError("recipe key 'train.accumulate' must be at least 1 (1 = no accumulation)")
        if self.threads is not None and self.threads < 1:
            raise FinetuneError(f"recipe key 'train.threads' is {self.threads}; it must be at least 1, or null to let "
                                "the core budget choose")
        if self.progress_every < 0:
            raise FinetuneError(f"recipe key 'train.progress_every' is {self.progress_every}; give the seconds between "
                                "progress lines, e.g. 60, or 0 for none")
        if not 0.0 < self.ema_decay < 1.0:
            raise FinetuneError("recipe key 'train.ema_decay' must be between 0 and 1, e.g. 0.999")
        if self.patience is not None and self.patience < 1:
            raise FinetuneError("recipe key 'train.patience' must be at least 1, or null to never stop early")
        for name in self.loggers:
            _choice("train.loggers", name, LOGGERS)
        if len(set(self.loggers)) != len(self.loggers):
            raise FinetuneError(f"recipe key 'train.loggers' names a logger twice: {_show(self.loggers)}")
        self._validate_stage_options()

    def _validate_stage_options(self) -> None:
        """Discriminative rates and unfreezing; stage names are checked against the model when it is built."""
        if self.lr_mult is not None and self.layer_decay is not None:
            raise FinetuneError("set either 'train.lr_mult' or 'train.layer_decay', not both")
        if self.lr_mult is not None and any(v <= 0 for v in self.lr_mult.values()):
            raise FinetuneError("recipe key 'train.lr_mult' needs positive multipliers; freeze a stage instead of 0")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise FinetuneError("recipe key 'train.layer_decay' must be in (0, 1], e.g. 0.7")
        if self.unfreeze is not None and self.fine_tune is not None:
            raise FinetuneError("set either 'train.unfreeze' or 'train.fine_tune', not both")
        # A schedule reaching past train.epochs is allowed (`--set train.epochs=1` on any shipped recipe): those
        # stages simply stay frozen, and training says so when it starts (models/unfreezing.py).
        if self.fine_tune is not None and self.fine_tune < 1:
            raise FinetuneError(f"recipe key 'train.fine_tune' (head-only epochs) must be 1 or more, got {self.fine_tune}")
        for epoch, stages in (self.unfreeze or {}).items():
            if epoch < 2:
                raise FinetuneError(
                    f"train.unfreeze epoch {epoch} must be 2 or later; what trains in epoch 1 is what model.trainable "
                    "says"
                )
            if not stages:
                raise FinetuneError(f"train.unfreeze epoch {epoch} lists no stages to unfreeze")


@dataclass
class SemiConfig:
    """Self-training on unlabeled images: a labels-only teacher, then `rounds` students on labels + pseudo-labels."""

    unlabeled: Optional[str] = None  # unlabeled image folder (any depth; relative to data.root); None = data.unlabeled
    rounds: int = 0  # pseudo-label rounds after the teacher (each: label the pool, train a student); 0 = off
    threshold: float = 0.9  # keep a pseudo-label when its calibrated probability is at least this
    max_per_class: Optional[int] = None  # at most K pseudo-labels per class, the most confident (balance); None = all
    student_augment: Optional[str] = None  # augment.preset for the students (Noisy Student: stronger, e.g. heavy)
    truth: Optional[str] = None  # CSV (file stem or name, label) of the pool's true labels: pseudo-label accuracy

    def __post_init__(self) -> None:
        self.validate()  # a bad section cannot be built, from YAML or in code

    def validate(self) -> None:
        """Reject out-of-range settings, naming the recipe key."""
        if self.rounds < 0:
            raise FinetuneError("recipe key 'semi.rounds' must be 0 (off) or more, e.g. 2")
        if not 0.0 < self.threshold <= 1.0:
            raise FinetuneError("recipe key 'semi.threshold' is a probability in (0, 1], e.g. 0.9")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise FinetuneError("recipe key 'semi.max_per_class' must be at least 1, or null for no limit")
        if self.student_augment is not None:
            _choice("semi.student_augment", self.student_augment, PRESETS)


@dataclass
class Recipe:
    """A whole run: data, model, augmentation and training settings."""

    name: str = "run"  # the run folder is <output>/<name> (suffixed -2, -3... if it exists)
    output: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)  # pseudo-labelling rounds (finetune/workflows/semi.py)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Recipe":
        """Reject settings that are out of range or conflict; returns self."""
        if not self.name or "/" in self.name or "\\" in self.name:
            raise FinetuneError("recipe key 'name' must be a non-empty name without slashes")
        self.data.validate()
        self.model.validate()
        self.augment.validate()
        self.train.validate()
        self.semi.validate()
        if self.train.monitor in MULTILABEL_METRICS and self.data.task != "multilabel":
            raise FinetuneError(f"train.monitor '{self.train.monitor}' is a multi-label metric; with data.task "
                                "'single' use val_acc or val_loss (or set data.task: multilabel)")
        if self.train.cache_features and (self.augment.mixup or self.augment.cutmix):
            raise FinetuneError("train.cache_features: true trains the head on backbone features, which "
                                "mixup/cutmix cannot blend; set augment.mixup and augment.cutmix to 0, or "
                                "train.cache_features: false")
        return self

    def to_dict(self) -> dict:
        """A plain dict, ready for YAML."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: Union[str, Path]) -> None:
        """Write the resolved recipe as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def derive(
        self,
        name: Optional[str] = None,
        output: Optional[str] = None,
        overrides: Sequence[str] = (),
        settings: Optional[dict[str, Any]] = None,
    ) -> "Recipe":
        """A validated copy: renamed, moved, with `--set`-style `overrides` and dotted-key `settings` applied."""
        raw = apply_overrides(self.to_dict(), overrides)
        # settings carry values, not YAML text (YAML would read 1e-06 as a string)
        for key, value in (settings or {}).items():
            _set_key(raw, key, value, f"recipe key {_show(key)}")
        if name is not None:
            raw["name"] = name
        if output is not None:
            raw["output"] = output
        return Recipe.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "Recipe":
        """Build and validate a recipe from a nested dict (as read from YAML)."""
        return _build(cls, raw, prefix="")


def flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe dict as dotted keys, {"train.lr": 0.001, ...}; mapping-valued settings (lr_mult) stay whole."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in _MAPPING_SETTINGS:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


_MAPPING_SETTINGS = ("lr_mult", "unfreeze")  # settings whose value is a mapping, not a section


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`, allowing int→float; raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except FinetuneError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FinetuneError(f"recipe key '{key}' must be a mapping of settings, got {_show(value)}")
        return _build(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise FinetuneError(f"recipe key '{key}' must be a list, got {_show(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FinetuneError(f"recipe key '{key}' must be a mapping, got {_show(value)}")
        key_tp, value_tp = typing.get_args(tp)
        # `--set train.unfreeze.3=[layer3]` arrives with the string key "3".
        return {
            _coerce(f"{key} key", int(k) if key_tp is int and isinstance(k, str) and k.isdigit() else k, key_tp):
            _coerce(f"{key}.{k}", v, value_tp)
            for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise FinetuneError(f"recipe key '{key}' must be {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise FinetuneError(
            f"unknown recipe key {_show(prefix + str(unknown[0]))}; valid keys here: "
            f"{', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def _set_key(raw: dict, key: str, value: Any, what: str) -> None:
    """Set dotted recipe key `key` in nested dict `raw`, creating sections; `what` names the setting in errors."""
    node = raw
    *sections, last = key.strip().split(".")
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FinetuneError(f"{what}: '{part}' is not a section")
    node[last] = value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise FinetuneError(f"override {_show(item)} must look like key=value, e.g. train.epochs=5")
        key, text = item.split("=", 1)
        try:
            value = read_yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise FinetuneError(
                f"override {_show(item)}: the value is not valid YAML ({_yaml_problem(err)}); quote lists and text, "
                "e.g. --set 'model.trainable=[layer4]'"
            ) from None
        _set_key(raw, key, value, f"override {_show(item)}")
    return raw


def load_recipe(path: Optional[Union[str, Path]] = None, overrides: Optional[Sequence[str]] = None) -> Recipe:
    """Read a recipe YAML or a shipped recipe by name (or start from defaults), apply overrides and validate."""
    raw: dict = {}
    if path is not None:
        path = find_recipe(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise FinetuneError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
        try:
            raw = read_yaml(text)
        except yaml.YAMLError as err:
            raise FinetuneError(f"recipe {path} is not valid YAML: {_yaml_problem(err)}") from None
        if raw is None:
            # An empty file is more likely a mistake (wrong or unsaved file) than a wish for all defaults.
            raise FinetuneError(f"recipe {path} is empty; write at least one section (e.g. 'model:'), or start "
                                "from a shipped recipe (finetune recipes copy NAME)")
        if not isinstance(raw, dict):
            raise FinetuneError(f"recipe {path} must be a mapping of sections (data:, model:, train:)")
    apply_overrides(raw, list(overrides or []))
    return Recipe.from_dict(raw)


def resolve_recipe(
    recipe: Union["Recipe", str, Path, None],
    overrides: Optional[list[str]] = None,
    data: Optional[Union[str, Path]] = None,
) -> "Recipe":
    """A validated Recipe from an object, a YAML path or defaults, with overrides and `--data` applied."""
    if isinstance(recipe, Recipe):
        resolved = recipe.derive(overrides=overrides or ())
    else:
        resolved = load_recipe(recipe, overrides)
    if data is not None:
        resolved.data.root = str(Path(data).expanduser().resolve())
    return resolved
