"""Python side of the densenet_efficient operators: fake kernels (for
torch.compile / FakeTensor) and autograd formulas. The schemas and the CPU/CUDA
kernels live in csrc/."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the operators)

ops = torch.ops.densenet_efficient
_lib = "densenet_efficient::"


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float32 for half/bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _channel_vector(input: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else math_dtype(input.dtype)
    return input.new_empty((input.shape[1],), dtype=dtype)


def _fake_4d(name: str, input: torch.Tensor) -> None:
    torch._check(input.dim() == 4, lambda: f"{name}: expected a 4-D input, got {input.dim()}-D")


# --- channel_stats ---------------------------------------------------------


@torch.library.register_fake(_lib + "channel_stats")
def _(input):
    _fake_4d("channel_stats", input)
    return _channel_vector(input), _channel_vector(input)


def _channel_stats_setup(ctx, inputs, output):
    (input,) = inputs
    mean, _ = output
    ctx.save_for_backward(input, mean)


def _channel_stats_backward(ctx, grad_mean, grad_var):
    # mean = Σx / M, var = Σ(x − mean)² / M  ⇒
    # dx = grad_mean / M + grad_var · 2 (x − mean) / M   (the mean term of
    # d var / dx sums to zero).
    input, mean = ctx.saved_tensors
    count = input.shape[0] * input.shape[2] * input.shape[3]
    as_channels = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    centered = input.to(mean.dtype) - as_channels(mean)
    grad = as_channels(grad_mean / count) + as_channels(grad_var * (2.0 / count)) * centered
    return grad.to(input.dtype)


torch.library.register_autograd(
    _lib + "channel_stats", _channel_stats_backward, setup_context=_channel_stats_setup
)


# --- bn_relu ----------------------------------------------------------------


@torch.library.register_fake(_lib + "bn_relu")
def _(input, mean, invstd, weight, bias):
    _fake_4d("bn_relu", input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake(_lib + "bn_relu_out")
def _(input, mean, invstd, weight, bias, out):
    _fake_4d("bn_relu_out", input)


def _bn_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bn_relu_backward(ctx, grad):
    # With mean and invstd as free inputs, y = γ (x − μ) r + β:
    #   dμ = −γ r Σg = −γ r dβ,   dr = γ Σ g (x − μ) = γ dγ / r
    # where dγ = r Σ g (x − μ) and dβ = Σ g come from the kernel.
    input, mean, invstd, weight, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = ops.bn_relu_backward(
        grad, input, mean, invstd, weight, bias, False
    )
    grad_mean = -(weight * invstd) * grad_bias
    grad_invstd = weight * grad_weight / invstd
    return grad_input, grad_mean, grad_invstd, grad_weight, grad_bias


torch.library.register_autograd(
    _lib + "bn_relu", _bn_relu_backward, setup_context=_bn_relu_setup
)


# --- bn_relu_backward (not differentiable itself) ---------------------------


@torch.library.register_fake(_lib + "bn_relu_backward")
def _(grad_output, input, mean, invstd, weight, bias, batch_stats):
    _fake_4d("bn_relu_backward", input)
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        _channel_vector(input, like=weight),
        _channel_vector(input, like=bias),
    )


@torch.library.register_fake(_lib + "bn_relu_backward_accumulate")
def _(grad_output, input, mean, invstd, weight, bias, batch_stats, grad_input_sum):
    _fake_4d("bn_relu_backward_accumulate", input)
    return _channel_vector(input, like=weight), _channel_vector(input, like=bias)


@torch.library.register_fake(_lib + "update_running_stats")
def _(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, momentum, count):
    return None


# --- the dense block --------------------------------------------------------

# Positions of the per-layer parameter lists in dense_block_forward's schema
# (input first); the backward schema has the same lists after
# (grad_output, output).
_PARAM_LISTS = {
    "norm1_weight": 0,
    "norm1_bias": 1,
    "norm1_running_mean": 2,
    "norm1_running_var": 3,
    "norm1_eps": 4,
    "conv1_weight": 5,
    "norm2_weight": 6,
    "norm2_bias": 7,
    "norm2_running_mean": 8,
    "norm2_running_var": 9,
    "norm2_eps": 10,
    "conv2_weight": 11,
}
_DIFFERENTIABLE = ("norm1_weight", "norm1_bias", "conv1_weight", "norm2_weight", "norm2_bias", "conv2_weight")


@torch.library.register_fake(_lib + "dense_block_forward")
def _(input, norm1_weight, norm1_bias, norm1_running_mean, norm1_running_var, norm1_eps,
      conv1_weight, norm2_weight, norm2_bias, norm2_running_mean, norm2_running_var, norm2_eps,
      conv2_weight, dropout_p, recompute_bottleneck, save_for_backward, sync_group, sync_count):
    _fake_4d("dense_block_forward", input)
    batch, in_channels, height, width = input.shape
    num_layers = len(conv1_weight)
    if conv2_weight:  # DenseNet-B layers
        growth, width_4k = conv2_weight[0].shape[0], conv1_weight[0].shape[0]
    else:  # plain layers: conv1 is the 3x3 conv
        growth, width_4k = conv1_weight[0].shape[0], 0
    stats = math_dtype(input.dtype)
    max_in = in_channels + (num_layers - 1) * growth
    output = input.new_empty((batch, in_channels + num_layers * growth, height, width))
    keep_bottlenecks = save_for_backward and not recompute_bottleneck and width_4k > 0
    bottlenecks = [input.new_empty((batch, width_4k, height, width)) for _ in range(num_layers)] if keep_bottlenecks else []
    masks = (
        [input.new_empty((batch, growth, height, width), dtype=torch.bool) for _ in range(num_layers)]
        if save_for_backward and dropout_p > 0
        else []
    )
    return (
        output,
        bottlenecks,
        input.new_empty((max_in,), dtype=stats),
        input.new_empty((max_in,), dtype=stats),
        input.new_empty((num_layers, width_4k), dtype=stats),
        input.new_empty((num_layers, width_4k), dtype=stats),
        masks,
    )


@torch.library.register_fake(_lib + "dense_block_backward")
def _(grad_output, output, norm1_weight, norm1_bias, norm1_running_mean, norm1_running_var,
      norm1_eps, conv1_weight, norm2_weight, norm2_bias, norm2_running_mean, norm2_running_var,
      norm2_eps, conv2_weight, bottlenecks, channel_mean, channel_var, bottleneck_mean,
      bottleneck_var, dropout_masks, dropout_p, sync_group, sync_count):
    batch, _, height, width = output.shape
    in_channels = conv1_weight[0].shape[1]
    grads = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    return (
        output.new_empty((batch, in_channels, height, width)),
        grads(norm1_weight),
        grads(norm1_bias),
        grads(conv1_weight),
        grads(norm2_weight),
        grads(norm2_bias),
        grads(conv2_weight),
    )


def _no_grad_like(value):
    """"No gradient" shaped as autograd's wrapper sees the input: a list of
    tensors (even empty) is a list, anything else (floats, Nones) one leaf."""
    if isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
        return [None] * len(value)
    return None


def _block_setup(ctx, inputs, output):
    input, *params = inputs[:13]
    dropout_p, _recompute, save_for_backward, sync_group, sync_count = inputs[13:]
    if not save_for_backward:
        raise RuntimeError(
            "dense_block_forward was called with save_for_backward=False while a gradient "
            "is required; pass save_for_backward=True"
        )
    block_output, bottlenecks, channel_mean, channel_var, bottleneck_mean, bottleneck_var, masks = output
    ctx.mark_non_differentiable(
        *bottlenecks, channel_mean, channel_var, bottleneck_mean, bottleneck_var, *masks
    )
    ctx.list_lengths = {name: len(params[i]) for name, i in _PARAM_LISTS.items()}
    ctx.eps = (params[_PARAM_LISTS["norm1_eps"]], params[_PARAM_LISTS["norm2_eps"]])
    ctx.num_bottlenecks = len(bottlenecks)
    ctx.num_masks = len(masks)
    ctx.dropout_p = dropout_p
    ctx.sync = (sync_group, sync_count)
    ctx.no_grads = {name: _no_grad_like(params[i]) for name, i in _PARAM_LISTS.items() if name not in _DIFFERENTIABLE}
    tensor_lists = [params[i] for name, i in _PARAM_LISTS.items() if not name.endswith("eps")]
    ctx.save_for_backward(
        block_output,
        *(t for tensors in tensor_lists for t in tensors),
        *bottlenecks,
        channel_mean, channel_var, bottleneck_mean, bottleneck_var,
        *masks,
    )


def _block_backward(ctx, grad_output, *_grads_of_non_differentiable_outputs):
    saved = list(ctx.saved_tensors)

    def take(count):
        taken = saved[:count]
        del saved[:count]
        return taken

    block_output = take(1)[0]
    lists = {}
    for name in _PARAM_LISTS:
        if name.endswith("eps"):
            lists[name] = list(ctx.eps[0] if name.startswith("norm1") else ctx.eps[1])
        else:
            lists[name] = take(ctx.list_lengths[name])
    bottlenecks = take(ctx.num_bottlenecks)
    channel_mean, channel_var, bottleneck_mean, bottleneck_var = take(4)
    masks = take(ctx.num_masks)
    grad_input, *param_grads = ops.dense_block_backward(
        grad_output, block_output, *lists.values(), bottlenecks,
        channel_mean, channel_var, bottleneck_mean, bottleneck_var, masks, ctx.dropout_p, *ctx.sync,
    )
    grads = {**ctx.no_grads, **dict(zip(_DIFFERENTIABLE, param_grads))}
    return (
        grad_input,
        *(grads.get(name) for name in _PARAM_LISTS),
        None,  # dropout_p
        None,  # recompute_bottleneck
        None,  # save_for_backward
        None,  # sync_group
        None,  # sync_count
    )


torch.library.register_autograd(
    _lib + "dense_block_forward", _block_backward, setup_context=_block_setup
)
