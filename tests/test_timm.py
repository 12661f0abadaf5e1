"""timm's DenseNets converted in place: the real timm from the package
registry (installed by the README's test command), no mocks."""

import copy

import pytest
import torch
from torch import nn

import densenet_efficient as de
from conftest import assert_results_close, randomize_norms, step_results

timm = pytest.importorskip("timm", reason="timm is not installed: pip install timm")

FAMILIES = ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264d", "densenetblur121d"]


def _model(name, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    randomize_norms(model, torch.Generator().manual_seed(1))  # no identity BatchNorms
    return model.to(dtype)


def _tensors(model):
    return dict([*model.named_parameters(), *model.named_buffers()])


@pytest.mark.parametrize("name", FAMILIES)
def test_every_timm_densenet_converts_keeping_its_tensors_and_keys(name):
    model = _model(name, dtype=torch.float32)
    before = _tensors(model)
    keys = list(model.state_dict())
    assert de.convert(model) is model
    blocks = [m for m in model.modules() if isinstance(m, de.DenseBlock)]
    assert len(blocks) == 4 and all(b.mode == "efficient" for b in blocks)
    assert not any(type(m).__name__ == "DenseBlock" and not isinstance(m, de.DenseBlock) for m in model.modules())
    after = _tensors(model)
    assert list(model.state_dict()) == keys
    assert after.keys() == before.keys() and all(after[n] is t for n, t in before.items())


@pytest.mark.parametrize("name", ["densenet121", "densenetblur121d"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
def test_converted_timm_model_computes_what_timm_computes(name, recompute):
    original = _model(name)
    converted = de.convert(copy.deepcopy(original), recompute_bottleneck=recompute)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grad = torch.randn(2, 10, dtype=torch.float64)
    for training in (True, False):
        original.train(training)
        converted.train(training)
        assert_results_close(step_results(converted, x, grad), step_results(original, x, grad), 1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_timm_transitions_run_as_one_operator_keeping_their_input(training):
    """timm's DenseTransition (BatchNormAct2d with a ReLU, conv, average
    pool) becomes our Transition on the same tensors: fused in efficient
    mode, it keeps only its input and two per-channel vectors."""
    original = _model("densenet121", dtype=torch.float32)
    norm = original.features.transition1.norm
    model = de.convert(original)
    transitions = [m for name, m in model.features.named_children() if name.startswith("transition")]
    assert len(transitions) == 3 and all(isinstance(t, de.models.Transition) and t.fused() for t in transitions)
    transition = model.features.transition1.train(training)
    assert transition.norm.weight is norm.weight and transition.norm.running_var is norm.running_var
    x = torch.randn(2, transition.norm.num_features, 8, 8, requires_grad=True)
    _, saved = de.memory.saved_tensor_bytes(transition, x, ignore=[*transition.parameters(), *transition.buffers()])
    assert saved == x.numel() * 4 + (2 * x.shape[1] * 4 if training else 0)


def test_timm_transitions_of_another_layout_stay_as_they_are():
    model = _model("densenet121", dtype=torch.float32)
    model.features.transition1.norm.act = nn.SiLU()
    model.features.transition2.pool = nn.MaxPool2d(2, 2)
    converted = de.convert(model)
    assert type(converted.features.transition1).__name__ == "DenseTransition"
    assert type(converted.features.transition2).__name__ == "DenseTransition"
    assert isinstance(converted.features.transition3, de.models.Transition)


def test_naive_mode_gives_back_timms_computation():
    original = _model("densenet121")
    converted = de.convert(copy.deepcopy(original), mode="naive")
    assert all(b.mode == "naive" for b in converted.modules() if isinstance(b, de.DenseBlock))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grad = torch.randn(2, 10, dtype=torch.float64)
    assert_results_close(step_results(converted, x, grad), step_results(original, x, grad), 1e-12)


def test_an_optimizer_made_before_conversion_keeps_training_the_model():
    model = _model("densenet121", dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    de.convert(model)
    norm = model.features.denseblock1.denselayer1.norm1
    weight, running_mean = norm.weight.detach().clone(), norm.running_mean.clone()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2])).backward()
    optimizer.step()
    assert not torch.equal(norm.weight, weight) and not torch.equal(norm.running_mean, running_mean)


def test_other_activations_are_refused_naming_the_module_and_nothing_changes():
    model = _model("densenet121", dtype=torch.float32, act_layer="silu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"features\.denseblock1\.denselayer1\.norm1 applies SiLU.*only a ReLU"):
        de.convert(model)
    assert not any(isinstance(m, de.DenseBlock) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_norm_with_drop_is_refused():
    model = _model("densenet121", dtype=torch.float32)
    model.features.denseblock2.denselayer3.norm2.drop = nn.Dropout(0.1)
    with pytest.raises(ValueError, match=r"features\.denseblock2\.denselayer3\.norm2 applies ReLU.*then Dropout"):
        de.convert(model)
