"""MONAI's DenseNets (2-D, 3-D and 1-D) converted in place: the real MONAI
from the package registry (installed by the README's test command), no mocks."""

import copy

import pytest
import torch
from torch import nn

import densenet_efficient as de
from conftest import assert_results_close, randomize_norms, step_results

monai_nets = pytest.importorskip("monai.networks.nets", reason="MONAI is not installed: pip install monai")

FAMILIES = ["DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"]


def _small(spatial_dims, dtype=torch.float64, **kwargs):
    """MONAI's DenseNet at a size a float64 test can afford."""
    torch.manual_seed(0)
    options = dict(init_features=8, growth_rate=4, block_config=(2, 3), **kwargs)
    model = monai_nets.DenseNet(spatial_dims=spatial_dims, in_channels=2, out_channels=3, **options)
    randomize_norms(model, torch.Generator().manual_seed(1))  # no identity BatchNorms
    return model.to(dtype)


def _input(spatial_dims, size=16, batch=2):
    return torch.randn(batch, 2, *[size] * spatial_dims, dtype=torch.float64), torch.randn(batch, 3, dtype=torch.float64)


def assert_same_step(ours, expected, tol):
    """assert_results_close, but for the stem's norm0 gradients, which are
    zero up to BatchNorm's eps in training (relu, max pool and the next
    batch-statistics BatchNorm undo a shift or scale of norm0's output): they
    are rounding noise and are compared against the scale of the model's
    other parameter gradients instead of their own."""
    vanishing = [n for n in expected if n.startswith("features.norm0.") and n.endswith(".grad")]
    scale = max(v.norm().item() for n, v in expected.items() if n.endswith(".grad") and n not in vanishing)
    for name in vanishing:
        assert (ours[name] - expected[name]).norm().item() <= tol * scale, name
    keep = lambda results: {n: v for n, v in results.items() if n not in vanishing}  # noqa: E731
    assert_results_close(keep(ours), keep(expected), tol)


def _tensors(model):
    return dict([*model.named_parameters(), *model.named_buffers()])


def _dense_blocks(model):
    return [m for m in model.modules() if isinstance(m, de.DenseBlock)]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_monai_densenet_converts_keeping_its_tensors_and_keys(name, spatial_dims):
    with torch.device("meta"):  # structure and identity only
        model = getattr(monai_nets, name)(spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    before = _tensors(model)
    keys = list(model.state_dict())
    assert de.convert(model) is model
    blocks = _dense_blocks(model)
    assert len(blocks) == 4 and all(b.mode == "efficient" for b in blocks)
    assert not any(type(m).__name__ == "_DenseBlock" for m in model.modules())
    after = _tensors(model)
    assert list(model.state_dict()) == keys
    assert after.keys() == before.keys() and all(after[n] is t for n, t in before.items())


@pytest.mark.parametrize("spatial_dims", [3, 2, 1])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
def test_converted_model_computes_what_monai_computes(spatial_dims, recompute):
    original = _small(spatial_dims)
    converted = de.convert(copy.deepcopy(original), recompute_bottleneck=recompute)
    x, grad = _input(spatial_dims, size=16 if spatial_dims > 1 else 64)
    for training in (True, False):
        original.train(training)
        converted.train(training)
        assert_same_step(step_results(converted, x, grad), step_results(original, x, grad), 1e-10)


def test_densenet121_3d_converted_computes_what_monai_computes():
    torch.manual_seed(0)
    original = monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).double()
    randomize_norms(original, torch.Generator().manual_seed(1))
    converted = de.convert(copy.deepcopy(original))
    # Batch 8: the last block (1³ at 32³) then has 8 values per channel; with
    # 2 its BatchNorms are ill-conditioned enough to lift rounding to 1e-8.
    x, grad = torch.randn(8, 1, 32, 32, 32, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    assert_same_step(step_results(converted, x, grad), step_results(original, x, grad), 1e-10)


def test_each_converted_block_returns_what_the_monai_block_returns():
    original = _small(3)
    block = original.features.denseblock2
    converted = de.convert(copy.deepcopy(block))
    assert isinstance(converted, de.DenseBlock)
    x = torch.randn(2, block.denselayer1.layers.norm1.num_features, 4, 5, 6, dtype=torch.float64)
    grad = torch.randn(2, block.denselayer3.layers.norm1.num_features + 4, 4, 5, 6, dtype=torch.float64)
    assert_results_close(step_results(converted, x, grad), step_results(block, x, grad), 1e-10)


@pytest.mark.parametrize("spatial_dims", [3, 1])
def test_naive_mode_gives_back_monais_computation_with_its_dropout(spatial_dims):
    """MONAI drops whole channels in 3-D (Dropout3d) and single values in 1-D:
    naive mode runs MONAI's own dropout module (same seed, same masks)."""
    original = _small(spatial_dims, dropout_prob=0.3)
    converted = de.convert(copy.deepcopy(original), mode="naive")
    assert all(b.mode == "naive" for b in _dense_blocks(converted))
    x, grad = _input(spatial_dims, size=12 if spatial_dims > 1 else 48)
    assert_results_close(step_results(converted, x, grad), step_results(original, x, grad), 1e-12)


@pytest.mark.parametrize("spatial_dims", [3, 2, 1])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
def test_dropout_runs_in_efficient_mode_as_monai_draws_it(spatial_dims, recompute):
    """Whole channels (Dropout3d/2d) in 3-D and 2-D, single values in 1-D:
    the same draws as MONAI's modules for the same seed."""
    original = _small(spatial_dims, dropout_prob=0.3)
    converted = de.convert(copy.deepcopy(original), recompute_bottleneck=recompute)
    layer = converted.features.denseblock1.denselayer1
    assert layer.drop_rate == pytest.approx(0.3) and layer.drops_whole_channels == (spatial_dims > 1)
    x, grad = _input(spatial_dims, size=12 if spatial_dims > 1 else 48)
    assert_same_step(step_results(converted, x, grad), step_results(original, x, grad), 1e-10)


@pytest.mark.parametrize("mode", ["naive", "efficient"])
def test_saved_bytes_with_channel_dropout_equal_the_model(mode):
    from densenet_efficient.memory import model_saved_bytes, saved_tensor_bytes

    model = de.convert(_small(3, dtype=torch.float32, dropout_prob=0.2), mode=mode)
    x = torch.randn(2, 2, 16, 16, 16)
    _, measured = saved_tensor_bytes(model, x, ignore=[*model.parameters(), *model.buffers()])
    assert measured == model_saved_bytes(model, tuple(x.shape))


def test_other_norms_convert_for_naive_mode_only():
    original = _small(3, norm="instance")
    with pytest.raises(ValueError, match=r"features\.denseblock1\.denselayer1\.norm1 = nn\.BatchNorm3d\(affine=True\).*got InstanceNorm3d"):
        de.convert(copy.deepcopy(original))
    converted = de.convert(copy.deepcopy(original), mode="naive")
    x, grad = _input(3, size=24)  # instance norms need more than one value per sample
    assert_results_close(step_results(converted, x, grad), step_results(original, x, grad), 1e-12)


def test_modes_switch_back_and_forth_and_state_dict_loads_into_monai():
    model = _small(3)
    keys = list(model.state_dict())
    de.convert(model)
    de.convert(model, mode="naive")
    de.convert(model, mode="efficient", recompute_bottleneck=True)
    assert all(b.mode == "efficient" and b.recompute_bottleneck for b in _dense_blocks(model))
    assert list(model.state_dict()) == keys
    fresh = _small(3)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    model.eval()
    x, _ = _input(3, size=12)
    assert torch.equal(fresh(x), fresh(x)) and (fresh(x) - model(x)).abs().max() <= 1e-12


def test_an_optimizer_made_before_conversion_keeps_training_the_model():
    model = _small(3, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    de.convert(model)
    norm = model.features.denseblock1.denselayer1.layers.norm1
    weight, running_mean = norm.weight.detach().clone(), norm.running_mean.clone()
    nn.functional.cross_entropy(model(torch.randn(2, 2, 12, 12, 12)), torch.tensor([1, 2])).backward()
    optimizer.step()
    assert not torch.equal(norm.weight, weight) and not torch.equal(norm.running_mean, running_mean)


def test_a_frozen_norm_stays_frozen_through_conversion():
    model = _small(3, dtype=torch.float32)
    frozen = model.features.denseblock1.denselayer2.layers.norm2
    frozen.eval()
    de.convert(model)
    assert model.training and not frozen.training
    assert model.features.denseblock1.denselayer2.layers.norm2 is frozen


def test_gradcheck_of_a_converted_block_with_channel_dropout():
    from torch.func import functional_call

    torch.manual_seed(0)
    block = monai_nets.densenet._DenseBlock(3, layers=2, in_channels=3, bn_size=2, growth_rate=2,
                                            dropout_prob=0.4).double()
    block = de.convert(block)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        torch.manual_seed(0)  # the same channel draws at every evaluation
        return functional_call(block, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
