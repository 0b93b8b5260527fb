"""The network of Table 1: parameter counts, every output shape, backbone-alone inference,
options (activation, branches, width, init) and the CSRNet baseline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepcount.model import (ALL_BRANCHES, INPUT_SIZE, MAP_SIZES, CSRNet, DeepCount,
                             count_parameters)

pytestmark = pytest.mark.offline  # the network alone: no datasets, no weights


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # scoped: a module-level set_grad_enabled would leak into other files
        yield


def conv(cin, cout, kh, kw):  # parameters of a (transposed) convolution with bias
    return cin * cout * kh * kw + cout


VGG = (conv(3, 64, 3, 3) + conv(64, 64, 3, 3) + conv(64, 128, 3, 3) + conv(128, 128, 3, 3)
       + conv(128, 256, 3, 3) + 2 * conv(256, 256, 3, 3) + conv(256, 512, 3, 3) + 2 * conv(512, 512, 3, 3))


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return DeepCount().eval()


def test_inference_parameters_are_table_1s_21_4_million(full):
    n = count_parameters(full.backbone)
    assert abs(n - 21.4e6) <= 0.05e6, n
    # By hand from Table 1 (+ one PReLU slope per channel of each non-VGG layer).
    by_hand = (VGG + conv(512, 256, 3, 3) + 4 * (conv(256, 512, 3, 3) + conv(512, 256, 3, 3))
               + conv(256, 1024, 3, 4) + (1024 + 1) + (256 + 4 * (512 + 256) + 1024))
    assert n == by_hand
    assert count_parameters(full.backbone.frontend) == VGG == 7_635_264


@pytest.mark.parametrize("k", ALL_BRANCHES)
def test_each_branch_has_its_own_weights_of_table_1s_size(full, k):
    ups = 5 - k
    expected = conv(1024, 256, 3, 4) + ups * conv(512, 256, 4, 4) + conv(512, 1, 1, 1) + 256 * (1 + ups)
    assert count_parameters(full.branches[str(k)]) == expected
    others = [p for j, b in full.branches.items() if j != str(k) for p in b.parameters()]
    assert not {id(p) for p in full.branches[str(k)].parameters()} & {id(p) for p in others}


def test_csrnet_parameters():
    assert count_parameters(CSRNet()) == VGG + (
        conv(512, 512, 3, 3) * 3 + conv(512, 256, 3, 3) + conv(256, 128, 3, 3)
        + conv(128, 64, 3, 3) + conv(64, 1, 1, 1)) == 16_263_489


def test_every_output_shape_at_full_width(full):
    x = torch.randn(2, 3, *INPUT_SIZE)
    count, maps = full.forward_maps(x)
    assert count.shape == (2,)
    assert sorted(maps) == list(ALL_BRANCHES)
    for k, m in maps.items():
        assert m.shape == (2, 1, *MAP_SIZES[k]), k
    assert MAP_SIZES == {1: (48, 64), 2: (24, 32), 3: (12, 16), 4: (6, 8), 5: (3, 4)}
    # the count of forward_maps is the backbone's count
    torch.testing.assert_close(full(x), count)
    vector, skips = full.backbone.features(x)
    assert vector.shape == (2, 1024, 1, 1)
    assert [tuple(s.shape[1:]) for s in skips] == [(256, *MAP_SIZES[k]) for k in ALL_BRANCHES]


def _called(model):
    calls = []
    for name, b in model.branches.items():
        b.register_forward_hook(lambda m, i, o, name=name: calls.append(int(name)))
    return calls


def test_counting_runs_the_backbone_alone_and_maps_run_only_what_is_asked():
    model = DeepCount(width=0.125).eval()
    calls = _called(model)
    x = torch.randn(1, 3, *INPUT_SIZE)
    model(x)
    assert calls == []
    _, maps = model.forward_maps(x, [3])
    assert calls == [3] and list(maps) == [3]
    calls.clear()
    model.forward_maps(x, [5, 1])
    assert sorted(calls) == [1, 5]


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="384x512"):
        DeepCount(width=0.125)(torch.randn(1, 3, 768, 1024))


@pytest.mark.parametrize("kind,cls", [("prelu", nn.PReLU), ("leaky_relu", nn.LeakyReLU), ("relu", nn.ReLU)])
def test_activation_option(kind, cls):
    model = DeepCount(width=0.125, activation=kind)
    acts = [m for m in [*model.backbone.body.modules(), *model.branches.modules()]
            if isinstance(m, (nn.PReLU, nn.LeakyReLU, nn.ReLU))]
    assert acts and all(isinstance(a, cls) for a in acts)
    if kind == "prelu":
        assert all(torch.all(a.weight == 0.2) for a in acts)
    if kind == "leaky_relu":
        assert all(a.negative_slope == 0.2 for a in acts)
    # the VGG16 frontend keeps ReLU
    assert all(isinstance(m, nn.ReLU) for m in model.backbone.frontend if not isinstance(m, (nn.Conv2d, nn.MaxPool2d)))
    with pytest.raises(ValueError):
        DeepCount(activation="gelu")


@pytest.mark.parametrize("detached", [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4, 5)])
def test_branches_can_be_detached_as_in_table_9(detached):
    attached = tuple(k for k in ALL_BRANCHES if k not in detached)
    model = DeepCount(width=0.125, branches=attached).eval()
    assert model.attached == attached
    count, maps = model.forward_maps(torch.randn(1, 3, *INPUT_SIZE))
    assert tuple(maps) == attached and count.shape == (1,)
    if detached:
        with pytest.raises(ValueError, match="not attached"):
            model.forward_maps(torch.randn(1, 3, *INPUT_SIZE), [detached[0]])


def test_xavier_weights_and_zero_biases_outside_vgg(full):
    layers = [m for m in [*full.backbone.body.modules(), *full.backbone.regressor.modules(),
                          full.backbone.fc, *full.branches.modules()]
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) == 9 + 1 + 1 + sum(2 + (5 - k) for k in ALL_BRANCHES)
    for m in layers:
        assert torch.count_nonzero(m.bias) == 0
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound
        if m.weight.numel() > 10_000:  # uniform(-b, b) has std b / sqrt(3)
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_width_multiplier_scales_every_inner_channel():
    small = DeepCount(width=0.25)
    assert small.backbone.frontend[0].out_channels == 16 and small.backbone.frontend[0].in_channels == 3
    assert small.backbone.vector_channels == 256
    assert small.branches["1"].predict.out_channels == 1
    assert count_parameters(small.backbone) < count_parameters(DeepCount().backbone) / 10
    c, maps = small.eval().forward_maps(torch.randn(1, 3, *INPUT_SIZE))
    assert {k: tuple(m.shape[-2:]) for k, m in maps.items()} == MAP_SIZES


def test_state_dict_keys_follow_torchvision_and_csrnet():
    keys = set(DeepCount(width=0.125).state_dict())
    assert {f"backbone.frontend.{i}.weight" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)} <= keys
    csr = set(CSRNet(width=0.125).state_dict())
    assert {"frontend.21.weight", "backend.10.weight", "output_layer.bias"} <= csr


@pytest.mark.parametrize("name", ["deepcount", "csrnet"])
def test_every_registered_network_has_the_same_small_interface(name):
    from deepcount.model import ARCHITECTURES, architecture, build

    torch.manual_seed(0)
    net = build({"model": name, "width": 0.125}).eval()
    assert type(net) is ARCHITECTURES[name] and architecture(net) == {"model": name, **net.config}
    assert type(build(architecture(net))) is type(net)
    x = torch.randn(2, 3, *INPUT_SIZE)
    counts = net(x)
    both, maps = net.forward_maps(x, net.density_branches)
    assert counts.shape == both.shape == (2,) and torch.allclose(counts, both, atol=1e-6)
    assert set(maps) == set(net.density_branches)
    for k, m in maps.items():
        assert tuple(m.shape) == (2, 1, *MAP_SIZES[k])
    if net.counts_by_map:  # the count is its map's sum
        assert torch.allclose(counts, maps[net.density_branches[0]].sum((1, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        net.forward_maps(x, [9])


def test_build_names_the_registered_networks_for_an_unknown_one():
    from deepcount.model import architecture, build

    with pytest.raises(ValueError, match=r"unknown architecture 'resnet'; expected one of \['csrnet', 'deepcount'\]"):
        build({"model": "resnet"})
    with pytest.raises(TypeError, match="not a deepcount network"):
        architecture(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["deepcount", "csrnet"])
def test_every_architecture_has_the_interface_the_rest_of_the_package_uses(name):
    from deepcount.model import ARCHITECTURES, architecture, build
    net = build({"model": name, "width": 0.125}).eval()
    assert isinstance(net, ARCHITECTURES[name]) and architecture(net)["model"] == name
    assert isinstance(net.frontend, nn.Sequential) and len(net.frontend) == 23
    x = torch.rand(1, 3, *INPUT_SIZE)
    count, maps = net.forward_maps(x, net.density_branches[:1])
    assert count.shape == (1,) and list(maps) == list(net.density_branches[:1])
    assert torch.allclose(count, net(x), rtol=1e-5, atol=1e-5)
    whole = net.with_branches(None)  # shares the modules: the same tensors, not copies
    assert {k: v.data_ptr() for k, v in whole.state_dict().items()} == \
        {k: v.data_ptr() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError):
        net.with_branches((7,))
    if net.feature_levels:  # started from conv4_2 features: the same count as from the image
        feats = net.frontend[:21](x)
        assert torch.allclose(net(feats, level="conv4_2"), net(x), rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="images"):
            net.forward_maps(x, level="conv4_2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        count, _ = net.forward_maps(x, (), float32_head=True)
    assert count.dtype == (torch.bfloat16 if net.counts_by_map else torch.float32)


def test_with_branches_keeps_the_backbone_and_only_the_branches_asked_for():
    net = DeepCount(0.125)
    two = net.with_branches((2,))
    assert two.attached == (2,) and two.config["branches"] == [2] and net.attached == ALL_BRANCHES
    assert two.backbone is net.backbone and two.branches["2"] is net.branches["2"]
    assert not [k for k in two.state_dict() if k.startswith("branches.") and not k.startswith("branches.2.")]
    net.start_counts_at(31.0)
    assert net.backbone.fc.bias.item() == 31.0
    h, w = MAP_SIZES[3]
    assert math.isclose(net.branches["3"].predict.bias.item(), 31.0 / (h * w), rel_tol=1e-6)
    # only branch 3 starts over (a run from a file that lacked it): the head and branch 2 stay
    net.start_counts_at(5.0, [3], head=False)
    assert net.backbone.fc.bias.item() == 31.0
    assert math.isclose(net.branches["3"].predict.bias.item(), 5.0 / (h * w), rel_tol=1e-6)
    h2, w2 = MAP_SIZES[2]
    assert math.isclose(net.branches["2"].predict.bias.item(), 31.0 / (h2 * w2), rel_tol=1e-6)
