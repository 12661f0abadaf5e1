#include "shifted_taps.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace densenet_efficient::cpu {

// Derivation. With c = (k − 1)/2 and tap t at offset δ_t ∈ [−c, c]^d,
//   y[n, :, p] = Σ_t W_t · x[n, :, p + δ_t]  (W_t = W[:, :, t], x zero off the map),
//   dW_t = Σ_n Σ_p dy[n, :, p] ⊗ x[n, :, p + δ_t],
//   dx[n, :, q] = Σ_t Σ_{p + δ_t = q} W_tᵀ · dy[n, :, p].
// Lay each sample out on a grid of pitch a_d = S_d + c per spatial dimension
// (P = Π a_d rows per sample, row strides A_d = Π_{e>d} a_e): pixel p of
// sample n at row n·P + Σ_d p_d·A_d, every row with a coordinate p_d ≥ S_d
// zero. Row row(n, p) + off_t, off_t = Σ_d δ_d·A_d, is then pixel p + δ_t
// of sample n, or a zero row where p + δ_t leaves the map: a coordinate
// p_d + δ_d ∈ [S_d, S_d + c) is in that dimension's band of c zeros, one in
// [−c, 0) borrows from the next dimension out and lands in the band before
// it, and below sample 0 lie L = Σ_d c·A_d zero rows put before the grid.
// Over the first F = row(N − 1, last pixel) + 1 rows, with X and dY the
// grids' [rows, C] matrices (a grid's rows are its channel rows, so each is
// row-major without a copy):
//   dW_t = dY[0:F]ᵀ · X[L + off_t : L + off_t + F]   ([C_out, F]·[F, C_in]),
//   dX[L + off_t : L + off_t + F] += dY[0:F] · W_t    ([F, C_out]·[C_out, C_in]),
// dx being dX's interior: what lands in the bands comes from pixels whose
// tap leaves the map, and dY's zero rows add nothing. The bands cost
// (P/Π S_d − 1) of the work; each dW value is rounded once, each dx value
// once per tap.
namespace {
struct Grid {
  std::vector<int64_t> spatial;  // S_d
  std::vector<int64_t> pitch;  // a_d
  std::vector<int64_t> stride;  // A_d
  int64_t batch = 0;  // N
  int64_t rows_per_sample = 1;  // P
  int64_t lead = 0;  // L

  Grid(const at::Tensor& maps, int64_t kernel_size) : spatial(maps.sizes().slice(2).vec()), batch(maps.size(0)) {
    const auto centre = (kernel_size - 1) / 2;
    pitch.resize(spatial.size());
    stride.resize(spatial.size());
    for (size_t d = spatial.size(); d-- > 0;) {
      pitch[d] = spatial[d] + centre;
      stride[d] = rows_per_sample;
      rows_per_sample *= pitch[d];
      lead += centre * stride[d];
    }
  }

  int64_t rows() const {
    return batch * rows_per_sample;
  }

  // F: the row of the last pixel of the last sample, plus one.
  int64_t used_rows() const {
    auto used = (batch - 1) * rows_per_sample + 1;
    for (size_t d = 0; d < spatial.size(); ++d) {
      used += (spatial[d] - 1) * stride[d];
    }
    return used;
  }

  // Row offset of tap t (the weight's order: the last dimension fastest).
  int64_t offset(int64_t tap, int64_t kernel_size) const {
    const auto centre = (kernel_size - 1) / 2;
    int64_t offset = 0;
    for (size_t d = spatial.size(); d-- > 0;) {
      offset += (tap % kernel_size - centre) * stride[d];
      tap /= kernel_size;
    }
    return offset;
  }

  // The [rows, C] grid's pixels as maps [N, C, *S] (a view).
  at::Tensor interior(const at::Tensor& grid_rows) const {
    std::vector<int64_t> sizes{batch};
    sizes.insert(sizes.end(), pitch.begin(), pitch.end());
    sizes.push_back(grid_rows.size(1));
    auto maps = grid_rows.view(sizes).movedim(-1, 1);
    for (size_t d = 0; d < spatial.size(); ++d) {
      maps = maps.narrow(static_cast<int64_t>(d) + 2, 0, spatial[d]);
    }
    return maps;
  }
};
} // namespace

int64_t shifted_tap_grid_elements(const at::Tensor& input, int64_t out_channels, int64_t kernel_size) {
  const Grid grid(input, kernel_size);
  return (grid.lead + grid.rows()) * input.size(1) + grid.rows() * out_channels;
}

std::tuple<at::Tensor, at::Tensor> shifted_tap_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight) {
  const auto kernel_size = weight.size(2);
  TORCH_INTERNAL_ASSERT(
      kernel_size % 2 == 1 && input.size(0) > 0 && grad_output.sizes().slice(2) == input.sizes().slice(2) &&
      weight.scalar_type() == input.scalar_type() && grad_output.scalar_type() == input.scalar_type());
  const Grid grid(input, kernel_size);
  const auto used = grid.used_rows();

  auto grad_rows = at::zeros({grid.rows(), grad_output.size(1)}, grad_output.options());
  grid.interior(grad_rows).copy_(grad_output);
  const auto grad_matrix = grad_rows.narrow(0, 0, used);
  // The input's grid, then (zeroed again) the input gradient's.
  auto rows = at::zeros({grid.lead + grid.rows(), input.size(1)}, input.options());
  const auto pixels = rows.narrow(0, grid.lead, grid.rows());
  grid.interior(pixels).copy_(input);

  // Contiguous or channels last (the caller lays it out as the weight): then
  // [C_out, C_in, T] is a view (row-major [C_out, C_in] tap slices for a
  // channels-last weight; strided for a contiguous one, which the GEMMs take
  // through copies of the slices).
  auto grad_weight = at::empty(weight.sizes(), grad_output.options().memory_format(weight.suggest_memory_format()));
  const auto grad_by_tap = grad_weight.flatten(2);
  const auto weight_by_tap = weight.flatten(2);
  const auto taps = grad_by_tap.size(2);
  const auto in_channels = input.size(1);
  // The input's rows read by tap t (one view: these run for every tap).
  const auto tap_rows = [&](int64_t t) {
    return rows.as_strided(
        {used, in_channels}, {in_channels, 1},
        rows.storage_offset() + (grid.lead + grid.offset(t, kernel_size)) * in_channels);
  };
  const auto grad_matrix_t = grad_matrix.t();
  for (int64_t t = 0; t < taps; ++t) {
    auto slice = grad_by_tap.select(2, t);
    at::mm_out(slice, grad_matrix_t, tap_rows(t));
  }
  rows.zero_();
  for (int64_t t = 0; t < taps; ++t) {
    tap_rows(t).addmm_(grad_matrix, weight_by_tap.select(2, t));
  }
  auto grad_input = at::empty(input.sizes(), input.options().memory_format(input.suggest_memory_format()));
  grad_input.copy_(grid.interior(pixels));
  return {grad_input, grad_weight};
}

} // namespace densenet_efficient::cpu
