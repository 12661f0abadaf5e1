"""End-to-end smoke test; CI also runs it against the CPU-only torch build."""

import torch

import densenet_efficient as de
from densenet_efficient.reference import ReferenceDenseBlock


def test_efficient_block_trains_like_the_reference():
    torch.manual_seed(0)
    block = de.DenseBlock(3, 4, growth_rate=2, bn_size=2).double()
    reference = ReferenceDenseBlock(3, 4, 2, 2, 0.0).double()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    out = block(x)
    expected = reference(x)
    assert out.shape == (2, 4 + 3 * 2, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(block.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12, msg=name)


def test_extension_matches_the_torch_build():
    cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "densenet_efficient::channel_stats", "CUDA"
    )
    if torch.version.cuda is None:
        assert not cuda_kernel, "a CPU-only torch cannot carry CUDA kernels"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("densenet_efficient::channel_stats", "CPU")
