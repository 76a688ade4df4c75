// CPU entry points of faststeal._C (declared in op_entry_points.inc; the CUDA ones, with the same
// signatures, in csrc/cuda/ops_cuda.h).
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/types.h>

namespace faststeal {

using OptTensor = std::optional<at::Tensor>;

namespace cpu {

#include "op_entry_points.inc"

namespace detail {
// y = x @ weight^T + bias for validated, contiguous x (S,B,K) or (B,K), weight (S,N,K), bias
// (S,N) or None; shared with bayes_linear.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias);

// The CPU GEMM of every op (csrc/cpu/gemm.cpp): out_s = a_s @ b_s^T (+ bias_s, then relu) for
// a (S,M,K) or shared (M,K), b (S,N,K), bias (S,N) or None; a and b may be strided views
// (transposes). Returns a new contiguous (S,M,N) tensor.
at::Tensor stacked_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                          bool relu);
}  // namespace detail

}  // namespace cpu
}  // namespace faststeal
