// What the CPU and CUDA kernels of the per-channel operators share: argument
// checks (so every device rejects bad input with the same message, before
// anything is written), the plane layout test, the per-channel vectors in math
// precision, and the host side of every operator.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "running_stats.h"

#include <limits>
#include <optional>
#include <tuple>

namespace densenet_efficient {

// The per-channel operators take [N, C, *spatial] tensors with 1 to 3
// spatial dimensions ([N, C, L], [N, C, H, W], [N, C, D, H, W]). A "plane" is
// one (sample, channel) pair's spatial elements.
constexpr int64_t kMinSpatialDims = 1;
constexpr int64_t kMaxSpatialDims = 3;

// Elements per plane: the product of the spatial sizes.
int64_t plane_size(const at::Tensor& t);

// True when every plane of `t` is one contiguous run of memory in row-major
// order (contiguous tensors and channel slices of them), which is the layout
// the kernels address directly.
bool has_contiguous_planes(const at::Tensor& t);

// `t` itself when its planes are contiguous, else a contiguous copy.
at::Tensor with_contiguous_planes(const at::Tensor& t);

// True when each (sample, pixel) of `t` holds its channels contiguously and
// every pixel, across samples too, lies a fixed `row_stride` from the next
// (channels_last tensors and channel slices of them): N·P rows of C values.
bool has_channel_rows(const at::Tensor& t);
int64_t row_stride(const at::Tensor& t);  // of a tensor with channel rows

// How the kernels walk a tensor: along its planes or along its channel rows.
enum class Walk { planes, rows };

// `t` walked as `walk` says: itself when its layout allows, else a copy
// (contiguous, or channels last).
at::Tensor in_walk(const at::Tensor& t, Walk walk);

// The dtypes the kernels compute in: float64, float32, float16, bfloat16.
// (at::isFloatingType also holds for the float8 and float4 types, which
// have no kernels and no math type.)
bool is_kernel_float(at::ScalarType dtype);

// What an error says is expected instead of a dtype is_kernel_float refuses.
constexpr const char* kKernelFloats = "float64, float32, float16 or bfloat16";

// `input` must be a [N, C, *spatial] tensor of a kernel float (is_kernel_float)
// with 1 to 3 spatial dimensions.
void check_planar_floating(const char* op, const char* name, const at::Tensor& input);

// Checks input ([N, C, *spatial], a kernel float) and the four per-channel vectors
// (1-D of length C, kernel floats, on input's device).
void check_bn_relu_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps);

// Checks that `other` (named `name`) matches input in shape, dtype and device.
void check_like_input(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& other);

// Checks a tensor an operator writes: no element stored twice (stride 0, or
// planes overlapping each other), and no partial overlap with any tensor it
// reads (a race on the GPU otherwise). Beyond ATen's TensorIterator, which
// gives up on strided views, channel slices of one buffer are compared
// exactly. Full overlap (in place) is allowed.
void check_destination(
    const char* op,
    const at::Tensor& destination,
    std::initializer_list<const at::Tensor*> read);

// Checks two [C] statistics destinations for `input` (named mean and var):
// 1-D, kernel floats, on input's device, not overlapping each other or input.
void check_stats_destinations(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var);

// mean, var, weight and bias converted to the input's math type (float for
// half/bfloat16, else the input's dtype) and made contiguous; vectors that
// already are stay as they are (no operator call).
struct ChannelVectors {
  at::Tensor mean, var, weight, bias;

  ChannelVectors(
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias);
};

// A norm's vectors (a ChannelVectors: math type, contiguous) as the raw
// pointers the CPU and CUDA kernels read, taken once per call: read through
// the tensors per channel, they cost a 640-channel CPU call 30 µs of checked
// data_ptr calls. Each channel's affine form: cpu::Affine (kernel_common.h),
// gpu::affine_of (bn_relu_math.cuh).
template <typename math_t>
struct ChannelParams {
  const math_t* mean;
  const math_t* var;
  const math_t* weight;
  const math_t* bias;
  math_t eps;
};

template <typename math_t>
ChannelParams<math_t> params_of(const ChannelVectors& v, double eps) {
  return {
      v.mean.const_data_ptr<math_t>(), v.var.const_data_ptr<math_t>(), v.weight.const_data_ptr<math_t>(),
      v.bias.const_data_ptr<math_t>(), static_cast<math_t>(eps)};
}

// dγ and dβ of a BatchNorm-ReLU over a batch (with synchronised BatchNorm,
// the global batch), [C] each, contiguous, in the input's math type.
struct AffineGradients {
  at::Tensor weight, bias;
};

// True when `v` can be written by a kernel directly: contiguous, in the math
// type of `input`.
bool is_math_vector(const at::Tensor& input, const at::Tensor& v);

// `v` as a kernel reads it: contiguous, in the math type of `input` (`v`
// itself when it already is).
at::Tensor as_math_vector(const at::Tensor& input, const at::Tensor& v);

// Checks `v` (named `name`) is a [C] vector of a kernel float on input's device.
void check_channel_vector(const char* op, const char* name, const at::Tensor& input, const at::Tensor& v);

// Checks `count` is one int64 value on input's device.
void check_count(const char* op, const at::Tensor& input, const at::Tensor& count);

// The host side of the per-channel operators, the same on every device:
// argument checks, device guard, output allocation, empty inputs, and
// destinations the kernels cannot address. `Kernels` is a device's:
//   static void channel_stats(input, mean, var)                     M > 0
//   static void copy_with_stats(source, destination, mean, var)      M > 0
//   static void bn_relu(input, vectors, eps, out)                    non-empty
//   template <bool accumulate> static void backward(grad_output, input,
//       vectors, eps, batch_stats, grad_input, grad_weight, grad_bias)  M > 0
//   static void grad_sums(grad_output, input, vectors, eps, grad_weight,
//       grad_bias)                                                     M > 0
//   template <bool accumulate> static void grad_input(grad_output, input,
//       vectors, eps, AffineGradients, count, grad_input)             non-empty
//   static void update_running_stats(update)            (running_stats.h)
// with every [N, C, *spatial] tensor of contiguous planes and every [C] vector a
// contiguous one in the math type; and, where kChannelRows, the same walking
// channel rows (channel_stats_rows, copy_with_stats_rows, bn_relu_rows,
// backward_rows, grad_sums_rows, grad_input_rows; `accumulate` an argument),
// every tensor then with channel rows. A destination the kernels can walk
// chooses the walk, and sources that cannot be walked so are copied; else the
// kernels write a temporary that is then copied over.
template <typename Kernels>
struct PerChannelOps {
  static std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
    check_planar_floating("channel_stats", "input", input);
    auto [mean, var] = math_vectors(input);
    channel_stats_out(input, mean, var);
    return {mean, var};
  }

  static void channel_stats_out(
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& var) {
    check_planar_floating("channel_stats", "input", input_);
    check_stats_destinations("channel_stats", input_, mean, var);
    const c10::DeviceGuard guard(input_.device());
    if (input_.numel() == 0) {
      fill_nan(mean, var);
      return;
    }
    const auto walk = walk_of(input_).value_or(Walk::planes);
    const auto input = in_walk(input_, walk);
    into_math_vectors(input, mean, var, [&](const at::Tensor& m, const at::Tensor& v) {
      along(
          walk, [&](auto k) { decltype(k)::channel_stats(input, m, v); },
          [&](auto k) { decltype(k)::channel_stats_rows(input, m, v); });
    });
  }

  static void copy_with_stats(
      const at::Tensor& source_,
      const at::Tensor& destination,
      const at::Tensor& mean,
      const at::Tensor& var) {
    constexpr const char* op = "copy_with_stats";
    check_planar_floating(op, "source", source_);
    check_like_input(op, "destination", source_, destination);
    check_stats_destinations(op, source_, mean, var);
    check_destination(op, destination, {&source_, &mean, &var});
    const c10::DeviceGuard guard(source_.device());
    if (source_.numel() == 0) {
      fill_nan(mean, var);
      return;
    }
    const auto walk = walk_of(destination);
    if (!walk) {
      destination.copy_(source_);
      channel_stats_out(source_, mean, var);
      return;
    }
    const auto source = in_walk(source_, *walk);
    into_math_vectors(source, mean, var, [&](const at::Tensor& m, const at::Tensor& v) {
      along(
          *walk, [&](auto k) { decltype(k)::copy_with_stats(source, destination, m, v); },
          [&](auto k) { decltype(k)::copy_with_stats_rows(source, destination, m, v); });
    });
  }

  static void bn_relu_out(
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps,
      const at::Tensor& out) {
    check_bn_relu_args("bn_relu", input_, mean, var, weight, bias, eps);
    check_like_input("bn_relu", "out", input_, out);
    check_destination("bn_relu", out, {&input_, &mean, &var, &weight, &bias});
    const c10::DeviceGuard guard(input_.device());
    if (input_.numel() == 0) {
      return;
    }
    const auto walk = walk_of(out);
    const auto input = in_walk(input_, walk.value_or(Walk::planes));
    const ChannelVectors vectors(input, mean, var, weight, bias);
    const auto into = [&](const at::Tensor& destination, Walk w) {
      along(
          w, [&](auto k) { decltype(k)::bn_relu(input, vectors, eps, destination); },
          [&](auto k) { decltype(k)::bn_relu_rows(input, vectors, eps, destination); });
    };
    if (walk) {
      into(out, *walk);
    } else {
      const auto planes = at::empty_like(input, at::MemoryFormat::Contiguous);
      into(planes, Walk::planes);
      out.copy_(planes);
    }
  }

  static at::Tensor bn_relu(
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps) {
    auto out = result_like(input);  // bn_relu_out checks
    bn_relu_out(input, mean, var, weight, bias, eps, out);
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps,
      bool batch_stats) {
    check_bn_relu_args("bn_relu_backward", input, mean, var, weight, bias, eps);
    check_like_input("bn_relu_backward", "grad_output", input, grad_output);
    const c10::DeviceGuard guard(input.device());
    auto grad_input = result_like(input);
    auto [grad_weight, grad_bias] = math_vectors(input);
    const auto walk = walk_of(grad_input);
    if (walk) {
      backward<false>(
          grad_output, input, mean, var, weight, bias, eps, batch_stats, grad_input, grad_weight, grad_bias,
          *walk);
    } else {
      const auto planes = at::empty_like(input, at::MemoryFormat::Contiguous);
      backward<false>(
          grad_output, input, mean, var, weight, bias, eps, batch_stats, planes, grad_weight, grad_bias,
          Walk::planes);
      grad_input.copy_(planes);
    }
    return {grad_input, like(grad_weight, weight), like(grad_bias, bias)};
  }

  static std::tuple<at::Tensor, at::Tensor> bn_relu_backward_accumulate(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps,
      bool batch_stats,
      const at::Tensor& grad_input_sum) {
    constexpr const char* op = "bn_relu_backward_accumulate";
    check_bn_relu_args(op, input, mean, var, weight, bias, eps);
    check_like_input(op, "grad_output", input, grad_output);
    check_like_input(op, "grad_input_sum", input, grad_input_sum);
    check_destination(op, grad_input_sum, {&grad_output, &input, &mean, &var, &weight, &bias});
    const c10::DeviceGuard guard(input.device());
    auto [grad_weight, grad_bias] = math_vectors(input);
    if (const auto walk = walk_of(grad_input_sum)) {
      backward<true>(
          grad_output, input, mean, var, weight, bias, eps, batch_stats, grad_input_sum,
          grad_weight, grad_bias, *walk);
    } else {
      auto grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
      backward<false>(
          grad_output, input, mean, var, weight, bias, eps, batch_stats, grad_input,
          grad_weight, grad_bias, Walk::planes);
      grad_input_sum.add_(grad_input);
    }
    return {like(grad_weight, weight), like(grad_bias, bias)};
  }

  // The two passes of backward apart, for synchronised BatchNorm, which
  // all-reduces dγ and dβ between them: first the sums of this batch, in the
  // math type (float for half/bfloat16, as PyTorch's SyncBatchNorm reduces
  // them), ...
  static std::tuple<at::Tensor, at::Tensor> bn_relu_backward_sums(
      const at::Tensor& grad_output,
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps) {
    constexpr const char* op = "bn_relu_backward_sums";
    check_bn_relu_args(op, input_, mean, var, weight, bias, eps);
    check_like_input(op, "grad_output", input_, grad_output);
    const c10::DeviceGuard guard(input_.device());
    // Named tensors, not structured bindings: the lambdas below capture them,
    // which C++17 does not allow of bindings (nvcc warns).
    at::Tensor grad_weight, grad_bias;
    std::tie(grad_weight, grad_bias) = math_vectors(input_);
    if (input_.numel() == 0) {
      grad_weight.zero_();
      grad_bias.zero_();
      return {grad_weight, grad_bias};
    }
    const auto walk = walk_of(input_).value_or(Walk::planes);
    const auto input = in_walk(input_, walk);
    const auto dy = in_walk(grad_output, walk);
    const ChannelVectors vectors(input, mean, var, weight, bias);
    along(
        walk, [&](auto k) { decltype(k)::grad_sums(dy, input, vectors, eps, grad_weight, grad_bias); },
        [&](auto k) { decltype(k)::grad_sums_rows(dy, input, vectors, eps, grad_weight, grad_bias); });
    return {grad_weight, grad_bias};
  }

  // ... then the input's gradient with batch statistics, from dγ and dβ
  // (`grad_weight`, `grad_bias`) and the number of values per channel
  // (`count`, one int64 on the device, read there) of the whole batch the
  // statistics are of: dx = γ·r·(g − dβ/M − (x − μ)·r·dγ/M), written into
  // `grad_input` or, with `accumulate`, added to it.
  static void bn_relu_backward_input(
      const at::Tensor& grad_output,
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias,
      const at::Tensor& count,
      bool accumulate,
      const at::Tensor& grad_input) {
    constexpr const char* op = "bn_relu_backward_input";
    check_bn_relu_args(op, input_, mean, var, weight, bias, eps);
    check_like_input(op, "grad_output", input_, grad_output);
    check_channel_vector(op, "grad_weight", input_, grad_weight);
    check_channel_vector(op, "grad_bias", input_, grad_bias);
    check_count(op, input_, count);
    check_like_input(op, "grad_input", input_, grad_input);
    check_destination(
        op, grad_input, {&grad_output, &input_, &mean, &var, &weight, &bias, &grad_weight, &grad_bias, &count});
    const c10::DeviceGuard guard(input_.device());
    if (input_.numel() == 0) {
      return;
    }
    const auto walk = walk_of(grad_input);
    const auto input = in_walk(input_, walk.value_or(Walk::planes));
    const auto dy = in_walk(grad_output, walk.value_or(Walk::planes));
    const ChannelVectors vectors(input, mean, var, weight, bias);
    const AffineGradients sums{as_math_vector(input, grad_weight), as_math_vector(input, grad_bias)};
    if (!walk) {
      const auto planes = at::empty_like(input, at::MemoryFormat::Contiguous);
      Kernels::template grad_input<false>(dy, input, vectors, eps, sums, count, planes);
      accumulate ? grad_input.add_(planes) : grad_input.copy_(planes);
      return;
    }
    along(
        *walk,
        [&](auto k) {
          if (accumulate) {
            decltype(k)::template grad_input<true>(dy, input, vectors, eps, sums, count, grad_input);
          } else {
            decltype(k)::template grad_input<false>(dy, input, vectors, eps, sums, count, grad_input);
          }
        },
        [&](auto k) { decltype(k)::grad_input_rows(dy, input, vectors, eps, sums, count, accumulate, grad_input); });
  }

 private:
  // How the kernels walk `t`: along its planes, or along its channel rows
  // where they can; none when it has neither.
  static std::optional<Walk> walk_of(const at::Tensor& t) {
    // One-pixel maps have both. On the CPU their rows, one vectorised run of
    // C values per sample, beat their planes, C runs of one value each
    // (MONAI's 3-D DenseNet121 at 32³: its last block's 1³ maps); CUDA's
    // choice there is unmeasured and stays the planes.
    if (Kernels::kChannelRows && t.is_cpu() && plane_size(t) == 1 && has_channel_rows(t)) {
      return Walk::rows;
    }
    if (has_contiguous_planes(t)) {
      return Walk::planes;
    }
    if (Kernels::kChannelRows && has_channel_rows(t)) {
      return Walk::rows;
    }
    return std::nullopt;
  }

  // Calls planes(Kernels{}) or rows(Kernels{}) as `walk` says; the kernels
  // of a device that walks no channel rows are never asked to.
  template <typename Planes, typename Rows>
  static void along(Walk walk, const Planes& planes, const Rows& rows) {
    if (walk == Walk::planes) {
      planes(Kernels{});
      return;
    }
    if constexpr (Kernels::kChannelRows) {
      rows(Kernels{});
    } else {
      TORCH_INTERNAL_ASSERT(false, "these kernels walk no channel rows");
    }
  }

  // A new tensor for a result like `input`: in its memory format where the
  // kernels walk channel rows (a channels-last input gives a channels-last
  // result, as ATen's BatchNorm does), else contiguous. _ops.py's fake
  // kernels say the same.
  static at::Tensor result_like(const at::Tensor& input) {
    return Kernels::kChannelRows ? at::empty_like(input) : at::empty_like(input, at::MemoryFormat::Contiguous);
  }

  // Two per-channel vectors in the input's math type.
  static std::tuple<at::Tensor, at::Tensor> math_vectors(const at::Tensor& input) {
    const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
    return {at::empty({input.size(1)}, options), at::empty({input.size(1)}, options)};
  }

  // `v` in the dtype of `reference` (no operator call when it already is).
  static at::Tensor like(const at::Tensor& v, const at::Tensor& reference) {
    return v.scalar_type() == reference.scalar_type() ? v : v.to(reference.scalar_type());
  }

  static void fill_nan(const at::Tensor& mean, const at::Tensor& var) {
    // Statistics of nothing, as torch.mean/var say.
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
  }

  // Runs `compute(m, v)` on math vectors: `mean` and `var` themselves when
  // the kernels can write them, else temporaries copied into them after.
  template <typename Compute>
  static void into_math_vectors(
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& var,
      const Compute& compute) {
    if (is_math_vector(input, mean) && is_math_vector(input, var)) {
      compute(mean, var);
      return;
    }
    auto [m, v] = math_vectors(input);
    compute(m, v);
    mean.copy_(m);
    var.copy_(v);
  }

  // Backward into `grad_input`, which `walk` walks.
  template <bool accumulate>
  static void backward(
      const at::Tensor& grad_output,
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& var,
      const at::Tensor& weight,
      const at::Tensor& bias,
      double eps,
      bool batch_stats,
      const at::Tensor& grad_input,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias,
      Walk walk) {
    if (input_.numel() == 0) {  // empty sums; the statistics (NaN) must not leak in
      grad_weight.zero_();
      grad_bias.zero_();
      return;
    }
    const auto input = in_walk(input_, walk);
    const auto dy = in_walk(grad_output, walk);
    const ChannelVectors vectors(input, mean, var, weight, bias);
    along(
        walk,
        [&](auto k) {
          decltype(k)::template backward<accumulate>(
              dy, input, vectors, eps, batch_stats, grad_input, grad_weight, grad_bias);
        },
        [&](auto k) {
          decltype(k)::backward_rows(
              dy, input, vectors, eps, batch_stats, accumulate, grad_input, grad_weight, grad_bias);
        });
  }
};

// Registers PerChannelOps<Kernels> for the dispatch key of `m`.
template <typename Kernels>
void register_per_channel_ops(torch::Library& m) {
  using Ops = PerChannelOps<Kernels>;
  m.impl("channel_stats", &Ops::channel_stats);
  m.impl("channel_stats_out", &Ops::channel_stats_out);
  m.impl("copy_with_stats", &Ops::copy_with_stats);
  m.impl("bn_relu", &Ops::bn_relu);
  m.impl("bn_relu_out", &Ops::bn_relu_out);
  m.impl("bn_relu_backward", &Ops::bn_relu_backward);
  m.impl("bn_relu_backward_accumulate", &Ops::bn_relu_backward_accumulate);
  m.impl("bn_relu_backward_sums", &Ops::bn_relu_backward_sums);
  m.impl("bn_relu_backward_input", &Ops::bn_relu_backward_input);
  m.impl("update_running_stats", &update_running_stats<Kernels>);
}

} // namespace densenet_efficient
