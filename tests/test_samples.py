"""Training samples (Section 3.4) on real ShanghaiTech crops, and a small DeepCount that
overfits four of them with the loss of eq. 3."""

from __future__ import annotations

import pytest
import torch

from deepcount.crops import CrowdCrops, crop_batch
from deepcount.datasets import shanghaitech
from deepcount.images import load_image, to_tensor
from deepcount.loss import paper_loss
from deepcount.model import MAP_SIZES, DeepCount
from deepcount.targets import OFFICIAL, GroundTruthCache, head_pixels


@pytest.fixture(scope="module")
def shb_train(shb_root):
    return shanghaitech(shb_root, "B", "train")


def test_sample_is_the_image_and_six_consistent_targets(shb_train):
    crops = CrowdCrops(shb_train)
    torch.manual_seed(0)
    x, targets = crops[7]
    assert x.shape == (3, 384, 512) and x.dtype == torch.float32
    assert len(targets) == 6
    for k, m in zip(sorted(MAP_SIZES), targets[:5]):
        assert m.shape == (1, *MAP_SIZES[k])
        assert float(m.sum()) == pytest.approx(float(targets[5]), abs=1e-3)
    assert targets[5].shape == ()


def test_crop_matches_the_image_and_the_heads_it_holds(shb_train):
    crops = CrowdCrops(shb_train)
    item = shb_train[3]
    image = load_image(item.image)
    x, t = crops.sample(3, top=100, left=300)
    torch.testing.assert_close(x, to_tensor(image[100:484, 300:812]))
    px = head_pixels(item.points, *image.shape[:2])
    inside = ((px[:, 0] >= 100) & (px[:, 0] < 484) & (px[:, 1] >= 300) & (px[:, 1] < 812)).sum()
    assert float(t[5]) == pytest.approx(float(inside), abs=1e-3)
    xf, tf = crops.sample(3, top=100, left=300, flip=True)
    torch.testing.assert_close(xf, x.flip(-1))
    for a, b in zip(t[:5], tf[:5]):
        torch.testing.assert_close(b, a.flip(-1))


def test_random_crops_are_repeatable_under_a_seed_and_mirror(shb_train):
    crops = CrowdCrops(shb_train, crops_per_image=30)
    assert len(crops) == 30 * 400
    torch.manual_seed(1)
    a = [crops[i][1][5] for i in range(6)]
    torch.manual_seed(1)
    b = [crops[i][1][5] for i in range(6)]
    assert a == b
    assert len({float(v) for v in a}) > 1  # six crops of one image differ


def test_small_images_are_padded_with_zero_targets(shb_root):
    part_a = shanghaitech(shb_root, "A", "train")
    small = [i for i, it in enumerate(part_a) if load_image(it.image).shape[0] < 384][:1]
    assert small, "ShanghaiTech A has images shorter than 384"
    crops = CrowdCrops(part_a)
    h, w = load_image(part_a[small[0]].image).shape[:2]
    x, t = crops.sample(small[0], 0, 0)
    assert torch.all(x[:, h:, :] == 0)
    rows = -(-h // 8)
    assert torch.all(t[0][0, rows:, :] == 0)
    assert float(t[5]) == pytest.approx(part_a[small[0]].count, abs=1e-3)  # no head lost


def test_grey_crops_and_cached_targets(shb_train, tmp_path):
    crops = CrowdCrops(shb_train, ground_truth=OFFICIAL, grey_probability=1.0, cache=GroundTruthCache(tmp_path))
    x, t = crops[0]
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # grey: the three channels hold the same luma before normalisation
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    raw = (x * std + mean) * 255
    assert torch.allclose(raw[0], raw[1], atol=1e-3) and torch.allclose(raw[1], raw[2], atol=1e-3)
    assert crops.kernels(0, 768, 1024).config == OFFICIAL


def test_crops_cut_on_the_device_equal_the_loader_crops(shb_root):
    """crop_batch (the GPU data path; here on CPU tensors) cuts exactly what CrowdCrops.sample
    makes from the same draws: crops, grey, mirror and padding of small images included, and
    params_only samples carry the same targets."""
    part_a = shanghaitech(shb_root, "A", "train")
    sizes = [load_image(it.image).shape[:2] for it in part_a[:40]]
    pick = [i for i, (h, w) in enumerate(sizes) if h < 384 or w < 512][:2] + [0, 1]
    subset = part_a[:max(pick) + 1]
    loader = CrowdCrops(subset, grey_probability=0.5)
    params_only = CrowdCrops(subset, grey_probability=0.5, params_only=True)
    draws = [(i, 1000 + j) for j, i in enumerate(pick * 3)]
    params, targets = zip(*(params_only[d] for d in draws))
    params = torch.stack(params)
    assert params[:, 3].any() and params[:, 4].any() and not params[:, 3].all()  # mirrors, greys, plain
    images = {int(i): torch.from_numpy(load_image(subset[int(i)].image)) for i in pick}
    cut = crop_batch([images.get(i, torch.zeros(1, 1, 3, dtype=torch.uint8)) for i in range(len(subset))], params)
    for j, d in enumerate(draws):
        x, t = loader[d]
        assert torch.equal(cut[j], x), f"sample {d}"
        assert all(torch.equal(a, b) for a, b in zip(t, targets[j]))


def test_a_small_deepcount_overfits_four_real_crops(shb_train):
    torch.manual_seed(0)
    crops = CrowdCrops(shb_train, mirror=False)
    samples = [crops.sample(i, top=200, left=256) for i in (0, 1, 2, 3)]
    x = torch.stack([s[0] for s in samples])
    targets = [torch.stack([s[1][k] for s in samples]) for k in range(6)]
    assert float(targets[5].min()) > 0  # real heads in every crop
    model = DeepCount(width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    errors = []
    for step in range(200):  # typically met after ~100 steps (~40 s on 2 cores)
        count, maps = model.forward_maps(x)
        errors.append(float((count.detach() - targets[5]).abs().mean()))
        if errors[-1] < 0.2 * errors[0]:
            break
        loss, _ = paper_loss(count, maps, targets[5], targets[:5])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float((model(x) - targets[5]).abs().mean())
    assert final < 0.2 * errors[0], (errors[0], final, len(errors))
