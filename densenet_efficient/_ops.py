"""Python side of the densenet_efficient operators: fake kernels (for
torch.compile / FakeTensor) and autograd formulas. The schemas and the CPU/CUDA
kernels live in csrc/.

The block operators take about twenty arguments; everything here reads them,
and their results, by the names in the schemas (csrc/ops.cpp), so adding an
argument cannot shift the others: a name missing on either side raises."""

from __future__ import annotations

from typing import Any

import torch

from .build_info import extension_load_error, record_kernel_devices

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as error:  # typically an extension built against another torch
    raise ImportError(extension_load_error(error)) from error
record_kernel_devices()

ops = torch.ops.densenet_efficient
_lib = "densenet_efficient::"


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float32 for half/bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def argument_names(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments]


def result_names(op: torch._ops.OpOverload) -> list[str]:
    return [r.name for r in op._schema.returns]


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of `op` by name."""
    names = argument_names(op)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if len(args) > len(names) or set(bound) != set(names):
        raise TypeError(f"{op}: expected the arguments {names}, got {list(bound)}")
    return bound


def _channel_vector(input: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else math_dtype(input.dtype)
    return input.new_empty((input.shape[1],), dtype=dtype)


def _fake_planar(name: str, input: torch.Tensor) -> None:
    torch._check(
        3 <= input.dim() <= 5,
        lambda: f"{name}: expected a 3-D, 4-D or 5-D input [N, C, *spatial], got {input.dim()}-D",
    )


def _result_like(input: torch.Tensor) -> torch.Tensor:
    """A per-channel operator's result like `input`, in its memory format: the
    CPU and CUDA kernels walk channels-last tensors in place, and ATen's
    BatchNorm keeps a channels-last input's layout (csrc/per_channel_ops.h,
    result_like)."""
    return torch.empty_like(input, memory_format=torch.preserve_format)


def _channels_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast over `like`'s channels: [1, C, 1, ...]."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


# --- channel statistics ----------------------------------------------------


@torch.library.register_fake(_lib + "channel_stats")
def _(input):
    _fake_planar("channel_stats", input)
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake(_lib + "channel_stats_out")
def _(input, mean, var):
    _fake_planar("channel_stats_out", input)


@torch.library.register_fake(_lib + "copy_with_stats")
def _(source, destination, mean, var):
    _fake_planar("copy_with_stats", source)


def _channel_stats_setup(ctx, inputs, output):
    (input,) = inputs
    mean, _ = output
    ctx.save_for_backward(input, mean)


def _channel_stats_backward(ctx, grad_mean, grad_var):
    # mean = Σx / M, var = Σ(x − mean)² / M  ⇒
    # dx = grad_mean / M + grad_var · 2 (x − mean) / M   (the mean term of
    # d var / dx sums to zero).
    input, mean = ctx.saved_tensors
    count = input.numel() // input.shape[1]
    centered = input.to(mean.dtype) - _channels_view(mean, input)
    grad = _channels_view(grad_mean / count, input) + _channels_view(grad_var * (2.0 / count), input) * centered
    return grad.to(input.dtype)


torch.library.register_autograd(
    _lib + "channel_stats", _channel_stats_backward, setup_context=_channel_stats_setup
)


# --- bn_relu ----------------------------------------------------------------


@torch.library.register_fake(_lib + "bn_relu")
def _(input, mean, var, weight, bias, eps):
    _fake_planar("bn_relu", input)
    return _result_like(input)


@torch.library.register_fake(_lib + "bn_relu_out")
def _(input, mean, var, weight, bias, eps, out):
    _fake_planar("bn_relu_out", input)


def refuse_second_order(op: str) -> None:
    """Our backward operators are not differentiable themselves: a backward
    pass that records a graph (create_graph=True) would fail deep inside ATen
    with a message naming none of this. Called at the start of each backward."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"densenet_efficient.{op}: efficient mode gives first-order gradients only, and this backward was "
            "asked to build a graph (create_graph=True: a gradient penalty, R1, meta-learning). Second-order "
            "gradients need mode='naive' or mode='checkpoint' (model.mode = 'naive' switches a whole model)"
        )


def _bn_relu_setup(ctx, inputs, output):
    *tensors, ctx.eps = inputs
    ctx.save_for_backward(*tensors)


def _bn_relu_backward(ctx, grad):
    # With mean and var as free inputs, y = γ (x − μ) r + β, r = (var + ε)^(-1/2):
    #   dμ = −γ r Σg = −γ r dβ,   dr = γ Σ g (x − μ) = γ dγ / r,
    #   dvar = dr · (−r³/2) = −γ dγ r² / 2
    # where dγ = r Σ g (x − μ) and dβ = Σ g come from the kernel.
    refuse_second_order("bn_relu")
    input, mean, var, weight, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = ops.bn_relu_backward(
        grad, input, mean, var, weight, bias, ctx.eps, False
    )
    invstd = torch.rsqrt(var + ctx.eps)
    grad_mean = -(weight * invstd) * grad_bias
    grad_var = -0.5 * weight * grad_weight * invstd.square()
    return grad_input, grad_mean, grad_var, grad_weight, grad_bias, None


torch.library.register_autograd(
    _lib + "bn_relu", _bn_relu_backward, setup_context=_bn_relu_setup
)


# --- bn_relu_backward (not differentiable itself) ---------------------------


@torch.library.register_fake(_lib + "bn_relu_backward")
def _(grad_output, input, mean, var, weight, bias, eps, batch_stats):
    _fake_planar("bn_relu_backward", input)
    return (
        _result_like(input),
        _channel_vector(input, like=weight),
        _channel_vector(input, like=bias),
    )


@torch.library.register_fake(_lib + "bn_relu_backward_accumulate")
def _(grad_output, input, mean, var, weight, bias, eps, batch_stats, grad_input_sum):
    _fake_planar("bn_relu_backward_accumulate", input)
    return _channel_vector(input, like=weight), _channel_vector(input, like=bias)


@torch.library.register_fake(_lib + "bn_relu_backward_sums")
def _(grad_output, input, mean, var, weight, bias, eps):
    _fake_planar("bn_relu_backward_sums", input)
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake(_lib + "bn_relu_backward_input")
def _(grad_output, input, mean, var, weight, bias, eps, grad_weight, grad_bias, count, accumulate, grad_input):
    _fake_planar("bn_relu_backward_input", input)


@torch.library.register_fake(_lib + "update_running_stats")
def _(running_mean, running_var, num_batches_tracked, momentum, offsets, batch_mean, batch_var, count):
    return None


# --- the dense block --------------------------------------------------------

_FORWARD = ops.dense_block_forward.default
_BACKWARD = ops.dense_block_backward.default
# The block operators' argument and result names, read once (the autograd
# functions below run every step).
FORWARD_ARGS, FORWARD_RESULTS = argument_names(_FORWARD), result_names(_FORWARD)
_BACKWARD_RESULTS = result_names(_BACKWARD)
# Gradients come back from the backward op as grad_<argument of forward>.
_GRAD_PREFIX = "grad_"


def block_statistics_size(num_input_features: int, num_layers: int, growth_rate: int, bottleneck_width: int) -> int:
    """Length of the block's flat statistics: the C_max channels some norm1
    reads, then each layer's bottleneck (csrc/dense_block.h)."""
    return num_input_features + (num_layers - 1) * growth_rate + num_layers * bottleneck_width


def block_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format an efficient block computes in and gives its output
    (csrc/dense_block.h): its input's, channels last or contiguous (always
    contiguous for 1-D blocks, and for volumes on CUDA)."""
    from torch._prims_common import suggest_memory_format

    if input.dim() not in (4, 5) or (input.dim() == 5 and input.device.type != "cpu"):
        return torch.contiguous_format
    channels_last = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    return channels_last if suggest_memory_format(input) == channels_last else torch.contiguous_format


def _maps(like: torch.Tensor, shape, memory_format: torch.memory_format, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


def _dropout_mask(input: torch.Tensor, growth: int, whole_channels: bool, memory_format) -> torch.Tensor:
    """What the block keeps of a layer's dropout: the scaled noise per sample
    and channel, or a bool mask per value (in the layout of the new features)."""
    batch, _, *spatial = input.shape
    if whole_channels:
        return input.new_empty((batch, growth, *[1] * len(spatial)))
    return _maps(input, (batch, growth, *spatial), memory_format, dtype=torch.bool)


@torch.library.register_fake(_lib + "dense_block_forward")
def _(*args, **kwargs):
    a = _bind(_FORWARD, args, kwargs)
    input = a["input"]
    _fake_planar("dense_block_forward", input)
    batch, in_channels, *spatial = input.shape
    conv1, conv2 = a["conv1_weight"], a["conv2_weight"]
    num_layers = len(conv1)
    if conv2:  # DenseNet-B layers
        growth, width_4k = conv2[0].shape[0], conv1[0].shape[0]
    else:  # plain layers: conv1 is the 3x3 conv
        growth, width_4k = conv1[0].shape[0], 0
    stats = math_dtype(input.dtype)
    size = block_statistics_size(in_channels, num_layers, growth, width_4k)
    save = a["save_for_backward"]
    keep_bottlenecks = save and not a["recompute_bottleneck"] and width_4k > 0
    memory_format = block_memory_format(input)
    results = {
        "output": _maps(input, (batch, in_channels + num_layers * growth, *spatial), memory_format),
        "bottlenecks": [_maps(input, (batch, width_4k, *spatial), memory_format) for _ in range(num_layers)]
        if keep_bottlenecks
        else [],
        "batch_mean": input.new_empty((size,), dtype=stats),
        "batch_var": input.new_empty((size,), dtype=stats),
        "count": input.new_empty((), dtype=torch.int64),
        "dropout_masks": [_dropout_mask(input, growth, a["dropout_whole_channels"], memory_format)
                          for _ in range(num_layers)]
        if save and a["dropout_p"] > 0
        else [],
    }
    return tuple(results[name] for name in FORWARD_RESULTS)


@torch.library.register_fake(_lib + "dense_block_backward")
def _(*args, **kwargs):
    a = _bind(_BACKWARD, args, kwargs)
    output = a["output"]
    batch, _, *spatial = output.shape
    in_channels = a["conv1_weight"][0].shape[1]
    memory_format = block_memory_format(output)  # the forward's: its output is in it
    grads = {"grad_input": _maps(output, (batch, in_channels, *spatial), memory_format)}
    for name in _BACKWARD_RESULTS[1:]:
        grads[name] = [torch.empty_like(t) for t in a[name[len(_GRAD_PREFIX):]]]  # laid out as the parameters
    return tuple(grads[name] for name in _BACKWARD_RESULTS)


def _is_tensor_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, torch.Tensor) for v in value)


def _no_grad_like(value):
    """"No gradient" shaped as autograd's wrapper sees the input: a list of
    tensors (even empty) is a list, anything else (floats, Nones) one leaf."""
    if isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
        return [None] * len(value)
    return None


class _PairedBackward:
    """Autograd of an operator whose backward is another operator, taking
    the output's gradient and then, by name, the forward's arguments and
    results, and returning grad_<argument> for the differentiable ones.
    Every result but `output` is non-differentiable (statistics, counts,
    masks, indices)."""

    def __init__(self, forward: torch._ops.OpOverload, backward: torch._ops.OpOverload):
        self.forward_args, self.forward_results = argument_names(forward), result_names(forward)
        self.forward_name = forward.name().split("::")[-1]
        self.backward_op = backward
        self.backward_args, self.backward_results = argument_names(backward), result_names(backward)

    def setup(self, ctx, inputs, output):
        args = dict(zip(self.forward_args, inputs))
        results = dict(zip(self.forward_results, output))
        if args.get("save_for_backward") is False:
            raise RuntimeError(
                "dense_block_forward was called with save_for_backward=False while a gradient "
                "is required; pass save_for_backward=True"
            )
        # Their gradients are never used: no zero tensors (one per bottleneck!)
        # should be made for them.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(
            *(t for name, value in results.items() if name != "output"
              for t in (value if isinstance(value, list) else [value]))
        )
        ctx.no_grads = {name: _no_grad_like(value) for name, value in args.items()}
        # Every argument of the backward op but the incoming gradient, by name,
        # from forward's arguments or results: tensors saved, the rest kept.
        ctx.layout, ctx.constants, tensors = [], {}, []
        for name in self.backward_args[1:]:
            if name == "image_grad":  # from ctx.needs_input_grad, in backward
                continue
            value = args[name] if name in args else results[name]
            if isinstance(value, torch.Tensor):
                ctx.layout.append((name, None))
                tensors.append(value)
            elif _is_tensor_list(value):
                ctx.layout.append((name, len(value)))
                tensors.extend(value)
            else:
                ctx.constants[name] = value
        ctx.save_for_backward(*tensors)

    def backward(self, ctx, grad_output, *_grads_of_non_differentiable_outputs):
        refuse_second_order(self.forward_name)
        if grad_output is None:  # no gradient reached the output (grads are not materialised)
            return tuple(ctx.no_grads[name] for name in self.forward_args)
        saved = iter(ctx.saved_tensors)
        arguments = {
            name: next(saved) if length is None else [next(saved) for _ in range(length)]
            for name, length in ctx.layout
        }
        needs_input_grad = ctx.needs_input_grad[self.forward_args.index("input")]
        if "image_grad" in self.backward_args:  # the operator can skip the input's gradient
            arguments["image_grad"] = needs_input_grad
        results = self.backward_op(grad_output, **arguments, **ctx.constants)
        grads = dict(zip(self.backward_results, results))
        if not needs_input_grad:
            grads.pop(_GRAD_PREFIX + "input")
        return tuple(grads.get(_GRAD_PREFIX + name, ctx.no_grads[name]) for name in self.forward_args)


def _register_paired_autograd(forward: str, backward: str) -> None:
    paired = _PairedBackward(getattr(ops, forward).default, getattr(ops, backward).default)
    torch.library.register_autograd(_lib + forward, paired.backward, setup_context=paired.setup)


_register_paired_autograd("dense_block_forward", "dense_block_backward")


# --- transition and stem pool (csrc/norm_relu_pool.cpp) ----------------------


def _returned_stats(input: torch.Tensor, running_stats: list) -> tuple[torch.Tensor, torch.Tensor]:
    channels = 0 if running_stats else input.shape[1]
    dtype = math_dtype(input.dtype)
    return input.new_empty((channels,), dtype=dtype), input.new_empty((channels,), dtype=dtype)


@torch.library.register_fake(_lib + "transition_forward")
def _(input, weight, bias, running_stats, eps, conv_weight):
    _fake_planar("transition_forward", input)
    batch, _, *spatial = input.shape
    output = _maps(input, (batch, conv_weight.shape[0], *[size // 2 for size in spatial]), block_memory_format(input))
    return (output, *_returned_stats(input, running_stats), input.new_empty((), dtype=torch.int64))


@torch.library.register_fake(_lib + "transition_backward")
def _(grad_output, input, weight, bias, running_stats, eps, conv_weight, batch_mean, batch_var):
    return (
        torch.empty_like(input, memory_format=block_memory_format(input)),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(conv_weight),
    )


def _stem_memory_format(image: torch.Tensor, conv_weight: torch.Tensor) -> torch.memory_format:
    """The stem's, as ATen's convolution would lay out conv0's output:
    channels last when the image or conv0's weight is (norm_relu_pool.cpp)."""
    image_format = block_memory_format(image)
    return image_format if image_format != torch.contiguous_format else block_memory_format(conv_weight)


@torch.library.register_fake(_lib + "stem_forward")
def _(input, conv_weight, conv_stride, conv_padding, weight, bias, running_stats, eps, kernel_size, stride, padding):
    _fake_planar("stem_forward", input)
    batch, _, *spatial = input.shape
    kernel = conv_weight.shape[2:]
    convolved = [(size + 2 * p - k) // s + 1 for size, k, s, p in zip(spatial, kernel, conv_stride, conv_padding)]
    pooled = [(size + 2 * p - k) // s + 1 for size, k, s, p in zip(convolved, kernel_size, stride, padding)]
    channels = conv_weight.shape[0]
    output = _maps(input, (batch, channels, *pooled), _stem_memory_format(input, conv_weight))
    stats = _returned_stats(input.new_empty((batch, channels, *convolved)), running_stats)
    return (output, *stats, input.new_empty((), dtype=torch.int64))


@torch.library.register_fake(_lib + "stem_backward")
def _(grad_output, input, conv_weight, conv_stride, conv_padding, weight, bias, running_stats, eps, kernel_size,
      stride, padding, batch_mean, batch_var, image_grad):
    grad_input = (torch.empty_like(input, memory_format=_stem_memory_format(input, conv_weight)) if image_grad
                  else input.new_empty((0,)))
    return (grad_input, torch.empty_like(conv_weight), torch.empty_like(weight),
            torch.empty_like(bias))


_register_paired_autograd("transition_forward", "transition_backward")
_register_paired_autograd("stem_forward", "stem_backward")
