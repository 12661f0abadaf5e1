#include "per_channel_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

namespace densenet_efficient {

int64_t plane_size(const at::Tensor& t) {
  int64_t size = 1;
  for (int64_t d = 2; d < t.dim(); ++d) {
    size *= t.size(d);
  }
  return size;
}

bool has_contiguous_planes(const at::Tensor& t) {
  if (t.dim() < 2 + kMinSpatialDims || t.dim() > 2 + kMaxSpatialDims) {
    return false;
  }
  int64_t expected = 1;  // the stride a row-major plane has in dimension d
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) > 1 && t.stride(d) != expected) {
      return false;
    }
    expected *= t.size(d);
  }
  return true;
}

at::Tensor with_contiguous_planes(const at::Tensor& t) {
  return has_contiguous_planes(t) ? t : t.contiguous();
}

namespace {
// The stride between consecutive pixels (spatial dimensions innermost, then
// samples) when they are uniformly spaced and hold channels of stride 1 (or
// one channel), else -1. With a single pixel in all, the channel count.
int64_t uniform_row_stride(const at::Tensor& t) {
  if (t.dim() < 2 + kMinSpatialDims || t.dim() > 2 + kMaxSpatialDims || (t.size(1) > 1 && t.stride(1) != 1)) {
    return -1;
  }
  // The pixel dimensions, innermost first: the spatial ones from the last, then the samples.
  std::vector<int64_t> pixel_dims;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    pixel_dims.push_back(d);
  }
  pixel_dims.push_back(0);
  int64_t stride = -1, span = 0;  // span: what the inner pixel dimensions cover
  for (const auto d : pixel_dims) {
    if (t.size(d) == 1) {
      continue;
    }
    if (stride < 0) {
      stride = t.stride(d);
      span = stride * t.size(d);
    } else if (t.stride(d) != span) {
      return -1;
    } else {
      span *= t.size(d);
    }
  }
  return stride < 0 ? t.size(1) : stride;
}
} // namespace

bool has_channel_rows(const at::Tensor& t) {
  const int64_t stride = uniform_row_stride(t);
  return stride >= t.size(1);  // rows that do not overlap
}

int64_t row_stride(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_channel_rows(t));
  return uniform_row_stride(t);
}

at::Tensor in_walk(const at::Tensor& t, Walk walk) {
  if (walk == Walk::planes) {
    return with_contiguous_planes(t);
  }
  if (has_channel_rows(t)) {
    return t;
  }
  // Channels last: [N, *spatial, C] contiguous, viewed back as [N, C, *spatial].
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) {
    order.push_back(d);
  }
  order.push_back(1);
  std::vector<int64_t> back(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    back[static_cast<size_t>(order[i])] = static_cast<int64_t>(i);
  }
  return t.permute(order).contiguous().permute(back);
}

bool is_kernel_float(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_planar_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      t.dim() >= 2 + kMinSpatialDims && t.dim() <= 2 + kMaxSpatialDims, op, ": expected ", name,
      " to be a 3-D, 4-D or 5-D tensor ([N, C, L], [N, C, H, W] or [N, C, D, H, W]), got a ",
      t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(
      is_kernel_float(t.scalar_type()), op, ": expected ", name, " to be ", kKernelFloats, ", got ",
      t.scalar_type());
}

void check_channel_vector(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& v) {
  const auto channels = input.size(1);
  TORCH_CHECK_VALUE(
      v.dim() == 1 && v.size(0) == channels, op, ": expected ", name,
      " of shape [", channels, "] (one value per input channel), got shape ",
      v.sizes());
  TORCH_CHECK_TYPE(
      is_kernel_float(v.scalar_type()), op, ": expected ", name, " to be ", kKernelFloats, ", got ",
      v.scalar_type());
  TORCH_CHECK(
      v.device() == input.device(), op, ": expected ", name,
      " on the input's device ", input.device(), ", got it on ", v.device());
}

void check_count(const char* op, const at::Tensor& input, const at::Tensor& count) {
  TORCH_CHECK_VALUE(
      count.numel() == 1 && count.scalar_type() == at::kLong, op,
      ": expected count to be one int64 value (values per channel), got a ", count.scalar_type(),
      " tensor of shape ", count.sizes());
  TORCH_CHECK(
      count.device() == input.device(), op, ": expected count on the input's device ", input.device(),
      ", got it on ", count.device());
}

void check_bn_relu_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps) {
  check_planar_floating(op, "input", input);
  check_channel_vector(op, "mean", input, mean);
  check_channel_vector(op, "var", input, var);
  check_channel_vector(op, "weight", input, weight);
  check_channel_vector(op, "bias", input, bias);
  TORCH_CHECK_VALUE(eps >= 0, op, ": expected eps >= 0, got ", eps);
}

void check_like_input(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& other) {
  TORCH_CHECK_VALUE(
      other.sizes() == input.sizes(), op, ": expected ", name, " of shape ",
      input.sizes(), " (the input's), got ", other.sizes());
  TORCH_CHECK_TYPE(
      other.scalar_type() == input.scalar_type(), op, ": expected ", name,
      " of dtype ", input.scalar_type(), " (the input's), got ",
      other.scalar_type());
  TORCH_CHECK(
      other.device() == input.device(), op, ": expected ", name,
      " on the input's device ", input.device(), ", got it on ",
      other.device());
}

namespace {
// Whether two planes of a tensor with contiguous planes share memory: with
// the sample and channel dimensions (those of size > 1) ordered by stride,
// each must step past everything the inner ones span.
bool planes_overlap(const at::Tensor& t) {
  const int64_t plane = plane_size(t);
  std::array<std::pair<int64_t, int64_t>, 2> dims{{{t.stride(0), t.size(0)}, {t.stride(1), t.size(1)}}};
  std::sort(dims.begin(), dims.end());
  int64_t span = plane;  // elements the inner dimensions reach, from the first
  for (const auto& [stride, size] : dims) {
    if (size <= 1) {
      continue;
    }
    if (stride < span) {
      return true;
    }
    span = stride * (size - 1) + span;
  }
  return false;
}

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Bytes [first, last] a non-empty tensor with non-negative strides addresses.
std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// Whether `a` and `b`, which ATen could not compare (strided views of one
// storage: channel slices), partly overlap. Exact for two tensors of one dtype
// with contiguous planes and equal sample and channel strides (slices of one
// buffer): plane (n', c') of b meets plane (n, c) of a when
// |Δn·stride_n + Δc·stride_c + d| < P, with d the offset between them; for
// each Δn the Δc that qualify form an interval. Otherwise: whether their byte
// extents meet, which may refuse an interleaving that would have been safe.
bool partly_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  if (a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides()) {
    return false;  // the same elements: in place
  }
  const bool lattice = a.scalar_type() == b.scalar_type() && has_contiguous_planes(a) &&
      has_contiguous_planes(b) && plane_size(a) == plane_size(b) && a.stride(0) == b.stride(0) &&
      a.stride(1) == b.stride(1) && a.stride(0) > 0 && a.stride(1) > 0;
  if (!lattice) {
    const auto [a_first, a_last] = byte_extent(a);
    const auto [b_first, b_last] = byte_extent(b);
    return a_first <= b_last && b_first <= a_last;
  }
  const int64_t plane = plane_size(a);
  const int64_t stride_n = a.stride(0), stride_c = a.stride(1);
  const int64_t d = b.storage_offset() - a.storage_offset();
  for (int64_t dn = -(a.size(0) - 1); dn <= b.size(0) - 1; ++dn) {
    const int64_t base = dn * stride_n + d;
    // Δc in [-(C_a - 1), C_b - 1] with -P < base + Δc·stride_c < P.
    const int64_t low = std::max(-(a.size(1) - 1), floor_div(-plane - base, stride_c) + 1);
    const int64_t high = std::min(b.size(1) - 1, -floor_div(-(plane - base), stride_c) - 1);
    if (low <= high) {
      return true;
    }
  }
  return false;
}
} // namespace

void check_destination(
    const char* op,
    const at::Tensor& destination,
    std::initializer_list<const at::Tensor*> read) {
  const bool overlapping = at::has_internal_overlap(destination) == at::MemOverlap::Yes ||
      (destination.numel() > 0 && has_contiguous_planes(destination) && planes_overlap(destination));
  TORCH_CHECK(
      !overlapping, op,
      ": the tensor written to has elements that share memory (a stride of 0, or "
      "overlapping strides), got shape ", destination.sizes(), " and strides ",
      destination.strides(), "; pass a tensor with distinct elements (e.g. .clone())");
  for (const auto* t : read) {
    const auto status = at::get_overlap_status(destination, *t);
    const bool partial = status == at::MemOverlapStatus::Partial ||
        (status == at::MemOverlapStatus::TooHard && partly_overlap(destination, *t));
    TORCH_CHECK(
        !partial, op,
        ": the tensor written to partly overlaps a tensor the operator reads "
        "(shapes ", destination.sizes(), " and ", t->sizes(),
        "); pass non-overlapping tensors (e.g. .clone() one of them)");
  }
}

void check_stats_destinations(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var) {
  check_channel_vector(op, "mean", input, mean);
  check_channel_vector(op, "var", input, var);
  for (const auto* t : {&mean, &var}) {
    TORCH_CHECK(
        at::has_internal_overlap(*t) != at::MemOverlap::Yes, op,
        ": a statistics destination has elements that share memory (strides ",
        t->strides(), ")");
  }
  const auto overlap = [](const at::Tensor& a, const at::Tensor& b) {
    const auto status = at::get_overlap_status(a, b);
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  };
  TORCH_CHECK(
      !overlap(mean, var) && !overlap(mean, input) && !overlap(var, input), op,
      ": mean and var must not overlap each other or the input");
}

bool is_math_vector(const at::Tensor& input, const at::Tensor& v) {
  return v.scalar_type() == at::toOpMathType(input.scalar_type()) && v.is_contiguous();
}

at::Tensor as_math_vector(const at::Tensor& input, const at::Tensor& v) {
  return is_math_vector(input, v) ? v : v.to(at::toOpMathType(input.scalar_type())).contiguous();
}

ChannelVectors::ChannelVectors(
    const at::Tensor& input,
    const at::Tensor& mean_,
    const at::Tensor& var_,
    const at::Tensor& weight_,
    const at::Tensor& bias_) {
  mean = as_math_vector(input, mean_);
  var = as_math_vector(input, var_);
  weight = as_math_vector(input, weight_);
  bias = as_math_vector(input, bias_);
}

} // namespace densenet_efficient
