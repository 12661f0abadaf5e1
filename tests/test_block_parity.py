"""The efficient block against the naive reference (the oracle): outputs, input
and parameter gradients, running statistics and num_batches_tracked, after one
step and after three SGD steps, in train and eval, with and without dropout and
recompute_bottleneck, over awkward shapes."""

import pytest
import torch

import densenet_efficient as de
from conftest import assert_results_close, make_pair, rel_error, step_results

FLOAT64_TOL = 1e-10

# (batch, height, width, num_input_features, growth_rate, num_layers, bn_size)
SHAPES = [
    pytest.param((2, 1, 1, 3, 2, 3, 4), id="N2-H1"),
    pytest.param((4, 7, 7, 5, 3, 3, 4), id="H7-odd-channels"),
    pytest.param((3, 4, 4, 6, 1, 4, 2), id="k1"),
    pytest.param((2, 5, 3, 7, 5, 2, 3), id="non-square"),
    pytest.param((1, 4, 4, 4, 2, 2, 4), id="N1-spatial"),  # legal in training: 16 values per channel
    pytest.param((3, 5, 5, 4, 3, 3, 0), id="plain-layers"),  # bn_size=0: BN-ReLU-Conv3x3, no bottleneck
    pytest.param((3, 1, 1, 4, 3, 3, 0), id="plain-layers-H1"),
]


def assert_one_step_parity(ours, reference, input_shape, out_channels):
    """One forward/backward of both blocks on the same random float64 input
    and output gradient: every result within FLOAT64_TOL."""
    batch, _, height, width = input_shape
    x = torch.randn(input_shape, dtype=torch.float64)
    grad = torch.randn(batch, out_channels, height, width, dtype=torch.float64)
    assert_results_close(step_results(ours, x, grad), step_results(reference, x, grad), FLOAT64_TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
def test_one_step_matches_reference_float64(shape, training, drop_rate, recompute):
    batch, height, width, c0, k, num_layers, bn_size = shape
    ours, reference = make_pair(num_layers, c0, k, bn_size, drop_rate, recompute_bottleneck=recompute)
    ours.train(training)
    reference.train(training)
    assert_one_step_parity(ours, reference, (batch, c0, height, width), out_channels=c0 + num_layers * k)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize(
    "recompute, bn_size", [(False, 4), (True, 4), (False, 0)], ids=["keep-bottleneck", "recompute", "plain"]
)
def test_three_sgd_steps_match_reference_float64(training, drop_rate, momentum, recompute, bn_size):
    ours, reference = make_pair(
        4, 6, 3, bn_size=bn_size, drop_rate=drop_rate, momentum=momentum, recompute_bottleneck=recompute
    )
    ours.train(training)
    reference.train(training)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, reference)]
    generator = torch.Generator().manual_seed(7)
    for step in range(3):
        x = torch.randn(3, 6, 5, 5, dtype=torch.float64, generator=generator)
        grad = torch.randn(3, 18, 5, 5, dtype=torch.float64, generator=generator)
        results = [step_results(m, x, grad, seed=step) for m in (ours, reference)]
        for optimizer in optimizers:
            optimizer.step()
        assert_results_close(*results, FLOAT64_TOL)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert rel_error(p, q) <= FLOAT64_TOL, name
    for (name, b), c in zip(ours.named_buffers(), reference.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c) and b.item() == (3 if training else 0), name
        else:
            assert rel_error(b, c) <= FLOAT64_TOL, name


def test_running_statistics_updated_exactly_once_per_step():
    ours, reference = make_pair(3, 4, 2)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    out = ours(x)
    out.sum().backward()
    reference(x).sum().backward()
    for (name, b), c in zip(ours.named_buffers(), reference.buffers()):
        if name.endswith("num_batches_tracked"):
            assert b.item() == 1, name
        assert rel_error(b, c) <= FLOAT64_TOL, name


def test_checkpoint_mode_updates_running_statistics_twice_like_torchvision():
    """torch.utils.checkpoint re-runs norm1 in backward; efficient mode does not."""
    block, _ = make_pair(2, 4, 2, mode="checkpoint")
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    block(x).sum().backward()
    assert block.denselayer1.norm1.num_batches_tracked.item() == 2
    assert block.denselayer1.norm2.num_batches_tracked.item() == 1


def _float_error_vs_float64(model_f32, model_f64, x64, grad64):
    res32 = step_results(model_f32, x64.float(), grad64.float())
    res64 = step_results(model_f64, x64, grad64)
    return {name: rel_error(res32[name], res64[name]) for name in res64 if not name.endswith("num_batches_tracked")}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_error_within_twice_pytorchs_own(training):
    """Efficient in float32 vs the float64 reference is at most 2× (plus a
    float32 rounding floor) the error of the naive float32 model."""
    ours32, ref32 = make_pair(6, 8, 4, dtype=torch.float32)
    ref64 = make_pair(6, 8, 4, dtype=torch.float64)[1]
    for m in (ours32, ref32, ref64):
        m.train(training)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, generator=generator)
    grad = torch.randn(4, 32, 6, 6, dtype=torch.float64, generator=generator)
    ours_err = _float_error_vs_float64(ours32, ref64, x, grad)
    naive_err = _float_error_vs_float64(ref32, ref64, x, grad)
    floor = 1e-6  # a few float32 ulps: where PyTorch happens to be exact
    for name, err in ours_err.items():
        assert err <= 2 * naive_err[name] + floor, f"{name}: {err:.3g} vs naive {naive_err[name]:.3g}"


# The same values in other layouts (for tensors whose samples are identical).
LAYOUTS = [
    pytest.param(lambda x: x.contiguous(memory_format=torch.channels_last), id="channels_last"),
    pytest.param(lambda x: x.transpose(2, 3).contiguous().transpose(2, 3), id="transposed-HW"),
    pytest.param(lambda x: torch.stack([x, torch.zeros_like(x)], 2)[:, :, 0], id="channel-strided"),
    pytest.param(lambda x: x[:1].expand(3, -1, -1, -1), id="expanded-batch"),
]


@pytest.mark.parametrize("make_input", LAYOUTS)
def test_layouts_give_the_same_result(make_input):
    # Identical samples, so that the batch can also be a stride-0 expansion.
    base = torch.randn(1, 5, 4, 6, dtype=torch.float64).expand(3, -1, -1, -1).contiguous()
    grad = torch.randn(3, 11, 4, 6, dtype=torch.float64)
    unusual = make_input(base)
    assert torch.equal(unusual, base) and unusual.stride() != base.stride()
    expected = step_results(make_pair(3, 5, 2)[0], base, grad)
    assert_results_close(step_results(make_pair(3, 5, 2)[0], unusual, grad), expected, FLOAT64_TOL)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
@pytest.mark.parametrize("make_grad", LAYOUTS)
def test_output_gradient_layouts_give_the_same_result(make_grad, recompute):
    # The last layer reads its gradient straight from the output gradient.
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    grad = torch.randn(1, 11, 4, 6, dtype=torch.float64).expand(3, -1, -1, -1).contiguous()
    unusual = make_grad(grad)
    assert torch.equal(unusual, grad) and unusual.stride() != grad.stride()
    expected = step_results(make_pair(3, 5, 2, recompute_bottleneck=recompute)[0], x, grad)
    got = step_results(make_pair(3, 5, 2, recompute_bottleneck=recompute)[0], x, unusual)
    assert_results_close(got, expected, FLOAT64_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_like_reference(training):
    ours, reference = make_pair(2, 4, 2)
    ours.train(training)
    reference.train(training)
    x = torch.randn(0, 4, 3, 3, dtype=torch.float64)
    grad = torch.randn(0, 8, 3, 3, dtype=torch.float64)
    mine, expected = step_results(ours, x, grad), step_results(reference, x, grad)
    assert mine["output"].shape == expected["output"].shape == (0, 8, 3, 3)
    assert_results_close(mine, expected, FLOAT64_TOL)


def test_no_grad_and_inference_mode_match_reference():
    ours, reference = make_pair(3, 4, 2)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out, expected = ours(x), reference(x)
    assert rel_error(out, expected) <= FLOAT64_TOL
    ours.eval()
    reference.eval()
    with torch.inference_mode():
        assert rel_error(ours(x), reference(x)) <= FLOAT64_TOL


def test_frozen_batchnorm_fine_tuning():
    """Eval-mode BN (running statistics) with gradients for the parameters."""
    ours, reference = make_pair(3, 4, 2)
    ours.eval()
    reference.eval()
    assert_one_step_parity(ours, reference, (3, 4, 5, 5), out_channels=10)


def test_some_norms_frozen_while_training():
    """Per-norm train/eval flags are honoured, as each nn.BatchNorm2d would."""
    ours, reference = make_pair(3, 4, 2)
    for block in (ours, reference):
        block.denselayer2.norm1.eval()
        block.denselayer3.norm2.eval()
    assert_one_step_parity(ours, reference, (3, 4, 5, 5), out_channels=10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_norms_without_running_statistics(training):
    """track_running_stats=False: batch statistics in train and eval alike."""
    def untracked(block):
        for layer in block.values():
            for name in ("norm1", "norm2"):
                norm = getattr(layer, name)
                fresh = torch.nn.BatchNorm2d(norm.num_features, track_running_stats=False).double()
                fresh.load_state_dict({"weight": norm.weight, "bias": norm.bias})
                setattr(layer, name, fresh)
        return block.train(training)

    ours, reference = (untracked(m) for m in make_pair(2, 4, 3))
    assert_one_step_parity(ours, reference, (3, 4, 5, 5), out_channels=10)


def test_eps_is_per_norm():
    ours, reference = make_pair(2, 4, 3)
    for block in (ours, reference):
        block.denselayer1.norm1.eps = 1e-2
        block.denselayer2.norm2.eps = 0.5
    assert_one_step_parity(ours, reference, (3, 4, 5, 5), out_channels=10)


@pytest.mark.parametrize("mode", de.MODES)
def test_every_mode_matches_reference(mode):
    ours, reference = make_pair(3, 4, 2, mode=mode)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grad = torch.randn(3, 10, 5, 5, dtype=torch.float64)
    mine, expected = step_results(ours, x, grad), step_results(reference, x, grad)
    if mode == "checkpoint":  # norm1 statistics are updated twice there (see above)
        mine = {k: v for k, v in mine.items() if ".norm1.running" not in k and ".norm1.num" not in k}
        expected = {k: v for k, v in expected.items() if k in mine}
    assert_results_close(mine, expected, FLOAT64_TOL)


def test_mode_switch_on_a_live_module_keeps_parameters():
    block, _ = make_pair(3, 4, 2)
    params = {n: p for n, p in block.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    block.eval()
    outputs = {}
    for mode in ("efficient", "naive", "checkpoint", "efficient"):
        block.mode = mode
        assert all(layer.mode == mode for layer in block.values())
        outputs[mode] = block(x)
        assert all(p is params[n] for n, p in block.named_parameters())
    assert rel_error(outputs["naive"], outputs["efficient"]) <= FLOAT64_TOL
    assert rel_error(outputs["checkpoint"], outputs["efficient"]) <= FLOAT64_TOL
    with pytest.raises(ValueError, match="mode must be one of"):
        block.mode = "fast"


def test_state_dict_interchangeable_with_torchvision():
    pytest.importorskip("torchvision")
    from torchvision.models.densenet import _DenseBlock

    ours, _ = make_pair(3, 6, 4)
    theirs = _DenseBlock(3, 6, 4, 4, 0.0).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    grad = torch.randn(2, 18, 5, 5, dtype=torch.float64)
    assert_results_close(step_results(ours, x, grad), step_results(theirs, x, grad), FLOAT64_TOL)


def test_dense_layer_alone_returns_its_new_features():
    torch.manual_seed(0)
    layer = de.DenseLayer(6, 3, bn_size=2).double()
    naive = de.DenseLayer(6, 3, bn_size=2, mode="naive").double()
    naive.load_state_dict(layer.state_dict())
    features = [torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)]
    out = layer(features)
    assert out.shape == (2, 3, 5, 5)
    assert rel_error(out, naive(features)) <= FLOAT64_TOL
