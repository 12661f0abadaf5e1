"""Models holding efficient blocks, transitions and stems export with no code
from the user: ONNX through the dynamo exporter (run by the real
onnxruntime), torch.jit.trace, and torch.export in train and eval. Inference
exports hold only ATen operators (the modules run one by one, the same
function); an exported training graph keeps the efficient operators."""

import copy
import io

import pytest
import torch

import densenet_efficient as de
from conftest import randomize_norms, rel_error
from densenet_efficient import models

def _torchvision():
    torchvision = pytest.importorskip("torchvision")
    return de.convert(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                  num_classes=5)), (2, 3, 64, 64)


def _timm():
    timm = pytest.importorskip("timm")
    return de.convert(timm.create_model("densenet121", pretrained=False, growth_rate=8, block_config=(2, 2),
                                        num_classes=5)), (2, 3, 64, 64)


def _monai(spatial_dims):
    def build():
        nets = pytest.importorskip("monai.networks.nets")
        model = nets.DenseNet(spatial_dims=spatial_dims, in_channels=1, out_channels=3, init_features=8,
                              growth_rate=4, block_config=(2, 2))
        return de.convert(model), (2, 1, *[32] * spatial_dims)
    return build


MODELS = {
    "torchvision": _torchvision,
    "timm": _timm,
    "monai-2d": _monai(2),
    "monai-3d": _monai(3),
    "densenet-bc-16-4": lambda: (models.densenet_bc(16, 4), (2, 3, 32, 32)),
    "ours-3d": lambda: (models.DenseNet(4, (2, 2), 8, num_classes=5, spatial_dims=3), (2, 3, 16, 16, 16)),
}


def _model(name):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    randomize_norms(model, torch.Generator().manual_seed(1))
    assert any(isinstance(m, de.DenseBlock) and m.mode == "efficient" for m in model.modules())
    return model.eval(), torch.randn(shape)


def _our_operators(graph_module) -> set[str]:
    """Our operators called anywhere in the exported graph (submodules of
    higher-order operators included)."""
    targets = {str(node.target) for module in graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}
    return {t for t in targets if t.startswith("densenet_efficient.")}


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_runs_in_onnxruntime_as_in_pytorch(name):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model, x = _model(name)
    with torch.no_grad():
        expected = model(x)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_error(torch.from_numpy(output), expected) <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_jit_trace_in_eval(name):
    model, x = _model(name)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        expected = model(x)
        assert rel_error(traced(x), expected) <= 1e-6
        other = torch.randn_like(x)
        assert rel_error(traced(other), model(other)) <= 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_in_eval_holds_only_aten_and_in_train_keeps_our_operators(name):
    model, x = _model(name)
    exported = torch.export.export(model, (x,))
    assert not _our_operators(exported.graph_module)
    assert rel_error(exported.module()(x), model(x)) <= 1e-6

    model.train()
    twin = copy.deepcopy(model)
    exported = torch.export.export(model, (x,))
    assert "densenet_efficient.dense_block_forward.default" in _our_operators(exported.graph_module)
    mine = exported.module()(x)
    assert rel_error(mine, twin(x)) <= 1e-6


def test_after_an_export_the_model_runs_its_efficient_operators_again():
    model, x = _model("densenet-bc-16-4")
    torch.jit.trace(model, x)
    torch.export.export(model, (x,))
    with torch.profiler.profile() as profile:
        model(x)
    assert any(e.name.startswith("densenet_efficient::dense_block_forward") for e in profile.events())
