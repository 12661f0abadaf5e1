"""What a new user meets first: the info command, the build record the
extension carries, and clear errors (with the fix) for an extension built
against another torch or without a device's kernels."""

import pytest
import torch

from densenet_efficient import build_info, info
from densenet_efficient.__main__ import main


def test_the_build_record_describes_this_extension():
    record = build_info.built_with()
    assert record is not None, "setup.py writes _build_info.json next to the extension"
    assert record["torch"] == torch.__version__
    assert record["cuda_kernels"] == build_info.cuda_kernels_registered()
    assert all(arch.startswith("sm_") for arch in record["cuda_architectures"])


def test_info_command_names_torch_the_build_devices_and_kernels(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "extension: built against torch" in out
    assert "kernels: CPU: all" in out
    assert ("cuda:0" in out) == torch.cuda.is_available()


def test_an_extension_built_against_another_torch_says_rebuild(monkeypatch):
    monkeypatch.setattr(build_info, "built_with", lambda: {"torch": "2.9.0", "cuda_kernels": False})
    message = build_info.extension_load_error(ImportError("undefined symbol: _ZN3c10..."))
    assert f"built against torch 2.9.0, but torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation --no-deps -e ." in message


def test_a_device_without_kernels_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(RuntimeError, match=r"cannot run on xpu: it has no kernels for xpu devices.*Rebuild"):
        build_info.require_kernels_for(torch.device("xpu"))
    monkeypatch.setattr(build_info, "built_with", lambda: {"torch": torch.__version__, "cuda_kernels": False})
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    monkeypatch.setattr(build_info, "_kernel_device_types", build_info._kernel_device_types)  # restored after
    build_info.record_kernel_devices()  # as if this extension had been loaded
    with pytest.raises(RuntimeError, match=r"built without CUDA kernels \(nvcc was not found"):
        build_info.require_kernels_for(torch.device("cuda"))
    assert info.lines()  # the info command still reports


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_the_kernel_check_compiles_into_a_full_graph(device_type):
    """The check runs inside every traced forward: under
    torch.compile(fullgraph=True) it must be plain Python on constants, for
    a device type not met before too (a dispatcher query there fails the
    compilation, and without fullgraph breaks the graph)."""
    if device_type == "cuda" and not build_info.cuda_kernels_registered():
        pytest.skip("a build without CUDA kernels refuses the cuda device (tested above)")
    torch._dynamo.reset()

    def check_then_add(x):
        build_info.require_kernels_for(torch.device(device_type))
        return x + 1

    compiled = torch.compile(check_then_add, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3))
