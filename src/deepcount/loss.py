"""The objective of Section 3.3.

Eq. 3: ``L = omega * 1/(2N) * sum_n sum_k sum_ij |y'_nk - f(X_n)_k|_ij * B(k) + lambda/2 ||theta||^2``
with ``B(k) = beta`` for the count (k = 6) and 1 for the five density maps.  The L2 term is
applied by the optimiser as weight decay (``weight_decay = lambda``: the gradient of
``lambda/2 ||theta||^2`` is ``lambda * theta``), so the functions here return the data term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

BETA = 16.0  # eq. 2: weight of the count term
OMEGA = 0.01  # eq. 3: overall scale
WEIGHT_DECAY = 1e-5  # eq. 3: lambda


def _terms(count: Tensor, maps: Mapping[int, Tensor], count_target: Tensor,
           map_targets: Sequence[Tensor] | Mapping[int, Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
    """Per-output L1 sums over the batch and the elements: the count, and each attached branch."""
    count_l1 = (count.float() - count_target.float()).abs().sum()
    per_map = {}
    for k, pred in maps.items():
        target = map_targets[k] if isinstance(map_targets, Mapping) else map_targets[k - 1]
        per_map[k] = (pred.float() - target.float().reshape(pred.shape)).abs().sum()
    return count_l1, per_map


def paper_loss(count: Tensor, maps: Mapping[int, Tensor], count_target: Tensor,
               map_targets: Sequence[Tensor] | Mapping[int, Tensor],
               beta: float = BETA, omega: float = OMEGA) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 3's data term. ``maps`` maps branch number -> (N, 1, h, w); ``map_targets`` is the
    five target maps (branch order) or a branch -> map mapping. Returns the loss and the
    per-output L1 terms (for logging)."""
    n = count.shape[0]
    count_l1, per_map = _terms(count, maps, count_target, map_targets)
    total = (beta * count_l1 + sum(per_map.values())) * omega / (2 * n)
    return total, {"count": count_l1.detach() / n, **{f"map{k}": v.detach() / n for k, v in per_map.items()}}


def official_loss(count: Tensor, maps: Mapping[int, Tensor], count_target: Tensor,
                  map_targets: Sequence[Tensor] | Mapping[int, Tensor],
                  beta: float = BETA) -> tuple[Tensor, dict[str, Tensor]]:
    """The authors' code: each head's mean L1 times its number of elements, the count head
    times ``beta``, the total divided by 100."""
    n = count.shape[0]
    count_l1, per_map = _terms(count, maps, count_target, map_targets)
    # mean over (batch, elements) * elements == sum / batch
    total = (beta * count_l1 + sum(per_map.values())) / n / 100.0
    return total, {"count": count_l1.detach() / n, **{f"map{k}": v.detach() / n for k, v in per_map.items()}}


def csrnet_loss(density: Tensor, map_target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The CSRNet baseline's objective (CSRNet-pytorch: ``MSELoss(size_average=False)`` at
    batch 1): the squared error summed over the 1/8-resolution map, averaged over the batch.
    ``map_target`` is branch 1's target (the same 48x64-per-crop grid)."""
    n = density.shape[0]
    sq = (density.float() - map_target.float().reshape(density.shape)).pow(2).sum()
    return sq / n, {"map1_l2": sq.detach() / n}
