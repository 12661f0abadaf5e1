"""Models and drop-in use: torchvision state_dicts, parameter counts,
convert(), torch.compile, several models in one process."""

import copy

import pytest
import torch
from torch import nn

import densenet_efficient as de
from conftest import rel_error
from densenet_efficient import models

torchvision = pytest.importorskip("torchvision")
from torchvision.models.densenet import _DenseBlock, _DenseLayer  # noqa: E402


def grad_error(actual, expected, floor=1e-2):
    """Relative error, with norms below `floor` compared absolutely: a
    gradient that cancels to ~1e-3 (the stem BN weight's does) carries
    rounding of its ~1 terms, not of its own size."""
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


def step(model, x, projection, optimizer=None):
    """Forward, a well-conditioned loss (a fixed random projection of the
    logits; a plain sum would cancel inside BatchNorm), backward, optional
    optimizer step. Returns the output."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * projection).sum().backward()
    if optimizer is not None:
        optimizer.step()
    return out.detach()


def assert_models_match(ours, theirs, x, projection, tol=1e-10):
    out, expected = step(ours, x, projection), step(theirs, x, projection)
    assert rel_error(out, expected) <= tol
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert grad_error(p.grad, q.grad) <= tol, name
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        assert rel_error(b, c) <= tol, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["efficient", "naive", "checkpoint"])
def test_torchvision_densenet121_state_dict_loads_and_matches(training, mode):
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121().double().train(training)
    ours = models.densenet121(mode=mode).double().train(training)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    projection = torch.randn(2, 1000, dtype=torch.float64)
    if mode == "checkpoint":  # checkpointing updates norm1 statistics twice in both
        theirs = copy.deepcopy(theirs)
        for block in theirs.features:
            if isinstance(block, _DenseBlock):
                for layer in block.values():
                    layer.memory_efficient = True
    assert_models_match(ours, theirs, x, projection)


def test_torchvision_legacy_keys_load():
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121()
    legacy = {}  # as early torchvision checkpoints: 'norm.1' keys, no num_batches_tracked yet
    for key, value in theirs.state_dict().items():
        if "denselayer" in key and key.endswith("num_batches_tracked"):
            continue
        for part in ("norm", "relu", "conv"):
            for index in ("1", "2"):
                key = key.replace(f".{part}{index}.", f".{part}.{index}.")
        legacy[key] = value
    assert any(".norm.1." in key for key in legacy)
    ours = models.densenet121()
    ours.load_state_dict(legacy)
    for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "builder, expected",
    [
        (models.densenet121, 7_978_856),
        (models.densenet161, 28_681_000),
        (models.densenet169, 14_149_480),
        (models.densenet201, 20_013_928),
    ],
)
def test_imagenet_parameter_counts_equal_torchvision(builder, expected):
    count = sum(p.numel() for p in builder().parameters())
    assert count == expected == sum(p.numel() for p in getattr(torchvision.models, builder.__name__)().parameters())


@pytest.mark.parametrize(
    "builder, millions",
    [
        (models.densenet_bc_100_12, 0.8),
        (models.densenet_bc_250_24, 15.3),
        (models.densenet_bc_190_40, 25.6),
        (lambda: models.densenet_cifar(40, 12), 1.0),
        (lambda: models.densenet_cifar(100, 12), 7.0),
        (lambda: models.densenet_cifar(100, 24), 27.2),
    ],
)
def test_cifar_parameter_counts_match_the_paper(builder, millions):
    assert round(sum(p.numel() for p in builder().parameters()) / 1e6, 1) == millions


def test_densenet264_structure():
    model = models.densenet264()
    assert [len(b) for b in model.dense_blocks()] == [6, 12, 64, 48]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: models.densenet_bc(101, 12), r"depth must be 6n \+ 4 with n >= 1 \(e.g. 100, 190, 250\), got 101"),
        (lambda: models.densenet_bc(4, 12), r"got 4"),
        (lambda: models.densenet_cifar(41, 12), r"depth must be 3n \+ 4 with n >= 1 \(e.g. 40, 100\), got 41"),
        (lambda: models.DenseNet(12, (2, 2), 24, compression=0), r"compression must be in \(0, 1\], got 0"),
    ],
)
def test_invalid_configurations_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("builder", [lambda **kw: models.densenet_bc(22, 6, **kw), lambda **kw: models.densenet_cifar(13, 6, **kw)],
                         ids=["bc", "plain"])
def test_cifar_models_efficient_matches_naive(builder):
    torch.manual_seed(0)
    ours = builder().double()
    naive = copy.deepcopy(ours)
    naive.mode = "naive"
    assert (ours.mode, naive.mode) == ("efficient", "naive")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert_models_match(ours, naive, x, torch.randn(4, 10, dtype=torch.float64))


def test_convert_torchvision_model_in_place():
    torch.manual_seed(0)
    model = torchvision.models.densenet121().double()
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    assert de.convert(model) is model
    assert isinstance(model.features.denseblock3, de.DenseBlock) and model.features.denseblock3.mode == "efficient"
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    projection = torch.randn(2, 1000, dtype=torch.float64)
    before = params["features.denseblock2.denselayer3.conv2.weight"].detach().clone()
    step(model, x, projection, optimizer)
    step(reference, x, projection, reference_optimizer)
    assert not torch.equal(params["features.denseblock2.denselayer3.conv2.weight"], before), "optimizer did not update"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert grad_error(p.detach(), q.detach()) <= 1e-10, name
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert rel_error(b, c) <= 1e-10, name

    de.convert(model, mode="naive")
    assert {b.mode for b in model.features if isinstance(b, de.DenseBlock)} == {"naive"}
    model.eval()
    reference.eval()
    assert rel_error(model(x), reference(x)) <= 1e-10


class UserModel(nn.Module):
    """A model of a user's that embeds dense blocks of several origins."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            _DenseBlock(2, 8, 2, 4, 0.0),
            nn.Conv2d(16, 8, 1, bias=False),
            de.reference.ReferenceDenseBlock(2, 8, 2, 4, 0.0),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_convert_a_user_model():
    torch.manual_seed(0)
    model = UserModel().double()
    reference = copy.deepcopy(model)
    de.convert(model, recompute_bottleneck=True)
    assert all(isinstance(model.body[i], de.DenseBlock) and model.body[i].recompute_bottleneck for i in (0, 2))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert_models_match(model, reference, x, torch.randn(3, 5, dtype=torch.float64))


def test_convert_a_bare_block_returns_the_new_block():
    block = _DenseBlock(2, 4, 2, 2, 0.0)
    converted = de.convert(block)
    assert isinstance(converted, de.DenseBlock) and converted.denselayer1.norm1 is block.denselayer1.norm1


class CustomLayer(_DenseLayer):
    def forward(self, input):  # a user's variation: not torchvision's computation
        return super().forward(input) * 2


def test_convert_refuses_what_it_cannot_convert_and_changes_nothing():
    model = UserModel()
    custom = CustomLayer(12, 4, 2, 0.0)  # (num_input_features, growth_rate, bn_size, drop_rate)
    custom.load_state_dict(model.body[0].denselayer2.state_dict())
    model.body[0].denselayer2 = custom
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"body\.0\.denselayer2 is a CustomLayer, not a dense layer it can convert"):
        de.convert(model)
    assert type(model.body[0]) is _DenseBlock and type(model.body[2]) is de.reference.ReferenceDenseBlock
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    other = UserModel()
    other.body[2].denselayer1.norm1 = nn.BatchNorm2d(8, affine=False)
    with pytest.raises(ValueError, match=r"body\.2\.denselayer1\.norm1 = nn.BatchNorm2d\(affine=True\)"):
        de.convert(other)
    assert type(other.body[0]) is _DenseBlock
    de.convert(other, mode="naive")  # naive mode computes anything torchvision can


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = models.densenet_bc(10, 4)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # a graph break raises
    x = torch.randn(4, 3, 32, 32)
    projection = torch.randn(4, 10)
    for _ in range(2):  # the second step reuses the compiled graph
        out, expected = step(compiled, x, projection), step(eager, x, projection)
        assert rel_error(out, expected) <= 1e-5
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert grad_error(p.grad, q.grad) <= 1e-4, name
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            assert rel_error(b, c) <= 1e-5, name


def test_two_models_in_one_process():
    torch.manual_seed(0)
    first, second = models.densenet_bc(16, 4).double(), models.densenet_cifar(10, 4).double()
    references = [copy.deepcopy(m) for m in (first, second)]
    for r in references:
        r.mode = "naive"
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    projection = torch.randn(3, 10, dtype=torch.float64)
    outputs = [first(x), second(x)]  # interleaved: both graphs alive at once
    for out in reversed(outputs):
        (out * projection).sum().backward()
    for model, reference in zip((first, second), references):
        (reference(x) * projection).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert grad_error(p.grad, q.grad) <= 1e-10, name


def test_convert_of_a_model_without_dense_blocks_says_what_it_looks_for():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match=r"found no dense block to convert in this Sequential; it looks for .*_DenseBlock"):
        de.convert(model)
