"""Eq. 3 and the authors' loss against hand computations (plain Python loops) on a tiny batch
whose targets are real ShanghaiTech B crops."""

from __future__ import annotations

import pytest
import torch

from deepcount.crops import CrowdCrops
from deepcount.datasets import shanghaitech
from deepcount.loss import BETA, OMEGA, csrnet_loss, official_loss, paper_loss
from deepcount.model import MAP_SIZES


@pytest.fixture(scope="module", params=[pytest.param("synthetic", marks=pytest.mark.offline), "shb"])
def batch(request):
    """Two crops' targets (real ShanghaiTech B crops, or offline synthetic ones) and predictions
    that differ from them by known noise."""
    if request.param == "synthetic":
        crops = CrowdCrops(request.getfixturevalue("synthetic")[:2])
    else:
        crops = CrowdCrops(shanghaitech(request.getfixturevalue("shb_root"), "B", "train")[:2])
    samples = [crops.sample(0, 10, 20), crops.sample(1, 100, 300, flip=True)]
    map_targets = [torch.stack([s[1][k] for s in samples]) for k in range(5)]
    count_target = torch.stack([s[1][5] for s in samples])
    g = torch.Generator().manual_seed(0)
    maps = {k + 1: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in enumerate(map_targets)}
    count = count_target + torch.tensor([3.5, -7.25])
    assert count_target.min() > 0  # real heads in both crops
    return count, maps, count_target, map_targets


def _hand_l1(pred, target) -> float:
    return sum(abs(float(p) - float(t)) for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()))


def test_paper_loss_is_equation_3(batch):
    count, maps, count_target, map_targets = batch
    n = 2
    total = 0.0
    for i in range(n):  # sum over n, over k, over elements; B(6) = beta, B(1..5) = 1
        for k in range(1, 6):
            total += _hand_l1(maps[k][i], map_targets[k - 1][i])
        total += BETA * abs(float(count[i]) - float(count_target[i]))
    expected = OMEGA * total / (2 * n)
    loss, parts = paper_loss(count, maps, count_target, map_targets)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(parts["count"]) == pytest.approx((3.5 + 7.25) / 2, rel=1e-6)
    assert set(parts) == {"count", "map1", "map2", "map3", "map4", "map5"}


def test_official_loss_is_mean_l1_times_elements(batch):
    count, maps, count_target, map_targets = batch
    n = 2
    total = 0.0
    for k, (h, w) in MAP_SIZES.items():  # tf.reduce_mean(|y - f|) * h * w
        mean = _hand_l1(maps[k], map_targets[k - 1]) / (n * h * w)
        total += mean * h * w
    total += BETA * _hand_l1(count, count_target) / n
    loss, _ = official_loss(count, maps, count_target, map_targets)
    assert float(loss) == pytest.approx(total / 100, rel=1e-5)


def test_detached_branches_leave_the_loss(batch):
    """Table 9: a detached branch has no term (only the attached outputs are summed)."""
    count, maps, count_target, map_targets = batch
    kept = {k: maps[k] for k in (3, 4, 5)}
    loss, parts = paper_loss(count, kept, count_target, map_targets)
    expected = OMEGA / 4 * (BETA * _hand_l1(count, count_target)
                            + sum(_hand_l1(maps[k], map_targets[k - 1]) for k in (3, 4, 5)))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"count", "map3", "map4", "map5"}


def test_csrnet_loss_is_summed_squares_per_image(batch):
    _, maps, _, map_targets = batch
    pred = maps[1]
    expected = sum((float(p) - float(t)) ** 2 for p, t in
                   zip(pred.flatten().tolist(), map_targets[0].flatten().tolist())) / 2
    loss, _ = csrnet_loss(pred, map_targets[0])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
