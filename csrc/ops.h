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

// CPU only (csrc/cpu/max_pool.cpp; on GPUs ATen's pooling is the fast path): max_pool2d over
// non-overlapping kernel_size x kernel_size windows of a contiguous NCHW float32/float64/bfloat16
// x, ATen's semantics; relu: of relu(x), in one pass from the pooled maximum of x.
at::Tensor max_pool2d_fwd(const at::Tensor& x, int64_t kernel_size, bool relu);
at::Tensor max_pool2d_bwd(const at::Tensor& grad_y, const at::Tensor& x, int64_t kernel_size,
                          bool relu);

// CPU only (csrc/cpu/conv_direct.cpp): S stacked stride-1 convolutions of float32 images computed
// directly (vector FMAs along output rows), x (S,B,C,H,W), weight (S,O,C,KH,KW), bias (S,O) or
// none, zero padding (ph, pw) smaller than the kernel, KW <= 7. isa: 0 the best this CPU has,
// 1 AVX2+FMA, 2 AVX-512; conv2d_direct_isa() is the best (0: none, the op is unavailable).
int64_t conv2d_direct_isa();
at::Tensor conv2d_direct_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                             int64_t ph, int64_t pw, int64_t isa);
// (dweight (S,O,C,KH,KW), dbias (S,O) or, without need_bias, an undefined tensor (None))
std::tuple<at::Tensor, at::Tensor> conv2d_direct_dw(const at::Tensor& grad_y, const at::Tensor& x,
                                                    int64_t kh, int64_t kw, int64_t ph,
                                                    int64_t pw, bool need_bias, int64_t isa);

// CPU only (csrc/cpu/adam_bf16.cpp; faststeal/master_weights.py): one torch.optim.Adam update of
// the first counts[i] elements of each float32 parameter params[i] of a list (in place, with its
// exp_avg / exp_avg_sq) from its bfloat16 gradient plus an optional float32 one, writing the
// parameter's bfloat16 working copy (same shape) in the same pass; one parallel pass over all of
// them, after every argument is checked. steps[i] counts this update of params[i] (>= 1). All
// tensors contiguous, on the CPU; different parameters must not overlap (their updates run
// concurrently). The arithmetic is that of the vector loop of torch's fused CPU Adam (see the
// file).
void adam_bf16_step(const std::vector<at::Tensor>& params,
                    const std::vector<at::Tensor>& grads_bf16,
                    const std::vector<OptTensor>& grads_f32,
                    const std::vector<at::Tensor>& exp_avgs,
                    const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<at::Tensor>& copies, const std::vector<int64_t>& steps,
                    const std::vector<int64_t>& counts, double lr, double beta1, double beta2,
                    double eps, double weight_decay);

// Which library runs the CPU ops' GEMMs on the calling thread (csrc/cpu/gemm.cpp): chosen by
// Python's measured dispatch (faststeal/ops/tuning.py) around each call. Returns the previous.
enum class GemmPath : int {
  kDefault = 0, kOneDNN = 1, kBmm = 2, kMm = 3, kPacked = 4, kUpcast = 5
};
GemmPath set_cpu_gemm_path(GemmPath path);

namespace detail {
// The per-member GEMM of the CPU ops (csrc/cpu/gemm.cpp): out_s = a_s @ b_s^T (+ bias_s, then
// relu) for a (S,M,K) or shared (M,K), b (S,N,K), bias (S,N) or None; a and b may be strided
// views (transposes). Returns a new contiguous (S,M,N) tensor.
at::Tensor stacked_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                          bool relu);

// a @ b for 2-D a, b (the shared-input backward's single GEMMs): at::mm, or for bfloat16/float16
// on the upcast path (chosen, or the default where oneDNN cannot multiply the dtype) at::mm of
// float32 copies rounded back to a's dtype.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

// The GEMM paths stacked_linear offers and its default rule (for `faststeal info`).
std::string cpu_gemm_library();
}  // namespace detail

}  // namespace cpu
}  // namespace faststeal
