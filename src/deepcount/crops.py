"""Training samples (Section 3.4): random 384x512 crops of annotated images with their six
targets (:class:`CrowdCrops`), the grey-crop augmentation of the authors' code and the crop
cutting that runs on the accelerator (:func:`crop_batch`).  The images and points come from
:mod:`deepcount.datasets`; the targets from :mod:`deepcount.targets`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .datasets import CrowdDataset
from .images import DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD, image_size, load_image, to_tensor
from .model import INPUT_SIZE as TILE
from .targets import PAPER, GroundTruthCache, GroundTruthConfig, HeadKernels

__all__ = ["CrowdCrops", "crop_batch", "draw_crop", "grey_levels"]


class CrowdCrops(torch.utils.data.Dataset):
    """Training samples (Section 3.4): a random 384x512 crop of an image and its six targets.

    Each sample is ``(image, (map1, ..., map5, count))``: a normalised (3, 384, 512) float32
    tensor, the five sum-pooled density maps (1, h, w) of branches 1..5 and the count (a
    0-d tensor).  Augmentation: a random crop (an image smaller than 384x512 is padded right
    and bottom with the ImageNet mean, its targets there are zero), a left-right mirror with
    probability 1/2, and, only when ``grey_probability > 0`` (the authors' code: 0.1), a grey
    crop.  ``crops_per_image`` repeats every image per pass (the authors' code: 30), or is a
    sequence of one count per image (:func:`crop_offsets`: a union weighting its datasets).  With
    probability ``overhang_probability`` the crop's top-left is drawn anywhere in the image, so
    the crop may overhang the right / bottom edge into padding (zero targets), as edge tiles do
    at inference: the network learns that padding holds nobody.
    Randomness comes from torch's generator, so ``torch.manual_seed`` and DataLoader worker
    seeding make runs repeatable; an index ``(i, seed)`` (what the training sampler yields)
    draws from a generator seeded with ``seed`` instead, so a sample depends on nothing else.
    Each image's ground truth is computed once per process (and read from / written to
    ``cache``, a :class:`GroundTruthCache`, when one is given); with ``keep_images`` each
    decoded image is kept in memory too (decode once per process).  With ``params_only`` a
    sample is ``([index, top, left, flip, grey], targets)``: no pixels are read, and
    :func:`crop_batch` cuts the crops where the images are (the GPU).
    """

    def __init__(self, dataset: CrowdDataset, ground_truth: GroundTruthConfig = PAPER,
                 crops_per_image: int | Sequence[int] = 1, mirror: bool = True, grey_probability: float = 0.0,
                 cache: GroundTruthCache | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 keep_images: bool = False, params_only: bool = False, overhang_probability: float = 0.0):
        self.dataset = dataset
        self.overhang_probability = float(overhang_probability)
        self.keep_images = keep_images
        self.params_only = params_only
        self._images: dict[int, np.ndarray] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        self.ground_truth = ground_truth
        self.offsets = crop_offsets(crops_per_image, len(dataset))
        self.mirror = mirror
        self.grey_probability = float(grey_probability)
        self.cache = cache
        self.max_pixels = max_pixels
        self._kernels: dict[int, HeadKernels] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def kernels(self, index: int, height: int, width: int) -> HeadKernels:
        """The ground truth of image ``index``: computed (or read from the disk cache) once."""
        k = self._kernels.get(index)
        if k is None or (k.height, k.width) != (height, width):
            points = self.dataset[index].points
            k = (self.cache.get(points, height, width, self.ground_truth) if self.cache is not None
                 else HeadKernels.from_points(points, height, width, self.ground_truth))
            self._kernels[index] = k
        return k

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index``: from the decoded image, else its header."""
        if index in self._images:
            return self._images[index].shape[:2]
        size = self._sizes.get(index)
        if size is None:
            size = self._sizes[index] = image_size(self.dataset[index].image)
        return size

    def targets(self, index: int, top: int, left: int, flip: bool = False) -> tuple[torch.Tensor, ...]:
        """The six targets of a crop: maps (1, h, w) of branches 1..5 and the count (0-d)."""
        t = self.kernels(index, *self.size(index)).crop(top, left, flip=flip)
        return (*(torch.from_numpy(m)[None] for m in t.maps), torch.tensor(t.count, dtype=torch.float32))

    def sample(self, index: int, top: int, left: int, flip: bool = False, grey: bool = False,
               image: np.ndarray | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The crop of image ``index`` at (top, left), deterministic (used by __getitem__)."""
        if image is None:
            image = self.image(index)
        patch = image[top:top + TILE[0], left:left + TILE[1]]
        if grey:
            patch = np.repeat(grey_levels(patch)[..., None], 3, 2)
        x = torch.zeros(3, *TILE)
        x[:, :patch.shape[0], :patch.shape[1]] = to_tensor(patch)
        if flip:
            x = x.flip(-1)  # the whole padded window, exactly as the targets are mirrored
        return x, self.targets(index, top, left, flip)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` decoded (once per process when ``keep_images``)."""
        image = self._images.get(index)
        if image is None:
            image = load_image(self.dataset[index].image, max_pixels=self.max_pixels)
            if self.keep_images:
                self._images[index] = image
        return image

    def draw(self, i: int | tuple[int, int]) -> tuple[int, int, int, bool, bool]:
        """The augmentation of sample ``i`` (an int, or ``(i, seed)``): image index, crop
        top-left, mirror, grey."""
        return draw_crop(i, self.offsets, self.size, TILE, self.overhang_probability,
                         self.mirror, self.grey_probability)

    def __getitem__(self, i: int | tuple[int, int]):
        index, top, left, flip, grey = self.draw(i)
        if self.params_only:  # the crop is cut on the device (crop_batch): no pixels here
            return torch.tensor([index, top, left, flip, grey]), self.targets(index, top, left, flip)
        return self.sample(index, top, left, flip, grey)


def crop_offsets(crops_per_image: int | Sequence[int], n: int) -> np.ndarray:
    """Where each of ``n`` images' crops begin among an epoch's samples: ``n + 1`` offsets, the
    last the epoch's length.  ``crops_per_image``: every image's crops per epoch, or a sequence
    of one count (>= 0) per image, e.g. a union giving each dataset's images their own."""
    counts = np.asarray(crops_per_image, dtype=np.int64)
    if counts.ndim == 0:
        counts = np.full(n, int(counts), dtype=np.int64)
    if counts.shape != (n,) or (counts < 0).any():
        raise ValueError(f"crops_per_image must be one count >= 0 or one per image ({n}), got {crops_per_image!r}")
    return np.concatenate([[0], np.cumsum(counts)])


def draw_crop(i: int | tuple[int, int], offsets: np.ndarray, size: Callable[[int], tuple[int, int]],
              tile: tuple[int, int], overhang_probability: float = 0.0, mirror: bool = True,
              grey_probability: float = 0.0) -> tuple[int, int, int, bool, bool]:
    """One training crop's draw, for pixel crops (:class:`CrowdCrops`) and feature crops
    (:class:`deepcount.features.FeatureCrops`) alike: sample ``i`` (an int, drawn from the
    global torch generator, or ``(i, seed)``, drawn from its own) of image ``k``, the one with
    ``offsets[k] <= i < offsets[k + 1]`` (:func:`crop_offsets`; with ``c`` crops of every image,
    ``k = i // c``), whose ``size(k)`` is (h, w) in the units of ``tile``.  Returns
    (image index, top, left, mirror, grey).  The crop lies inside the image when it fits (else
    at 0), or with ``overhang_probability`` anywhere its top-left is inside.  The draws come in
    a fixed order (overhang, top, left, mirror, grey), each only when its option is on, so a
    run rebuilt or resumed from its seed draws the same crops."""
    gen = None
    if isinstance(i, tuple):
        i, seed = i
        gen = torch.Generator().manual_seed(int(seed))
    index = int(np.searchsorted(offsets, int(i), side="right")) - 1
    h, w = size(index)
    overhang = overhang_probability > 0 and bool(torch.rand((), generator=gen) < overhang_probability)
    top_max, left_max = (h - 1, w - 1) if overhang else (max(h - tile[0], 0), max(w - tile[1], 0))
    top = int(torch.randint(0, top_max + 1, (), generator=gen))
    left = int(torch.randint(0, left_max + 1, (), generator=gen))
    flip = mirror and bool(torch.rand((), generator=gen) < 0.5)
    grey = grey_probability > 0 and bool(torch.rand((), generator=gen) < grey_probability)
    return index, top, left, flip, grey


def grey_levels(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """ITU-R 601 luma of uint8 RGB, rounded (as ``tf.image.rgb_to_grayscale``), uint8; the same
    float64 arithmetic in numpy and torch, so the two agree exactly."""
    r, g, b = (rgb[..., c] for c in range(3))
    if isinstance(rgb, np.ndarray):
        return (r * 0.299 + g * 0.587 + b * 0.114).round().astype(np.uint8)
    return (r.double() * 0.299 + g.double() * 0.587 + b.double() * 0.114).round().to(torch.uint8)


def crop_batch(images: Sequence[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """The crops :meth:`CrowdCrops.sample` makes, cut on the images' device: ``images`` are
    (H, W, 3) uint8 tensors (e.g. all training images resident on the GPU), ``params`` the
    (B, 5) rows ``[index, top, left, flip, grey]`` that ``CrowdCrops(params_only=True)``
    yields. Returns a normalised (B, 3, 384, 512) float32 batch."""
    device = images[0].device if len(images) else params.device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    out = torch.zeros(len(params), 3, *TILE, device=device)
    for j, (index, top, left, flip, grey) in enumerate(params.tolist()):
        patch = images[index][top:top + TILE[0], left:left + TILE[1]]
        if grey:
            patch = grey_levels(patch)[..., None].expand(-1, -1, 3)
        t = patch.permute(2, 0, 1).float().div_(255.0).sub_(mean).div_(std)
        out[j, :, :t.shape[1], :t.shape[2]] = t
        if flip:
            out[j] = out[j].flip(-1)
    return out
