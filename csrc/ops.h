// Entry points of faststeal._C (CPU here; CUDA ones in csrc/cuda/ops_cuda.h). Argument order and
// outputs follow the backend contract in faststeal/ops/reference.py; keys are 32-bit RNG keys
// passed as int64, optional biases / targets are None.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/types.h>

namespace faststeal {

using OptTensor = std::optional<at::Tensor>;

namespace cpu {

std::tuple<at::Tensor, at::Tensor> ensemble_linear_fwd(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const OptTensor& bias,
                                                       const std::string& activation,
                                                       double dropout_p, int64_t key);
// Returns (dx, dweight, dbias); dbias is an empty tensor when bias is None, dx one when
// need_dx is false (a first layer: its input needs no gradient, so its dx GEMM is skipped).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const at::Tensor& y, const at::Tensor& z,
    const std::string& activation, double dropout_p, int64_t key, bool need_dx);

at::Tensor bayes_linear_fwd(const at::Tensor& x, const at::Tensor& w_mu, const at::Tensor& w_rho,
                            const OptTensor& b_mu, const OptTensor& b_rho, int64_t samples,
                            int64_t key_w, int64_t key_b);
// Returns (dx, dw_mu, dw_rho, db_mu, db_rho); the bias grads are empty without a bias, dx
// without need_dx.
std::vector<at::Tensor> bayes_linear_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& w_mu, const at::Tensor& w_rho,
                                         const OptTensor& b_mu, const OptTensor& b_rho,
                                         int64_t samples, int64_t key_w, int64_t key_b,
                                         bool need_dx);

at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, double prior_sigma);
std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad, const at::Tensor& mu,
                                                   const at::Tensor& rho, double prior_sigma);

// The 9 fields of reference.MemberStats, in order.
std::vector<at::Tensor> member_stats_fwd(const at::Tensor& logits, const OptTensor& targets);

at::Tensor ensemble_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target);
at::Tensor ensemble_cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& target);

namespace detail {
// y = x @ weight^T + bias for validated, contiguous x (S,B,K) or (B,K), weight (S,N,K), bias
// (S,N) or None; shared with bayes_linear.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias);
}  // namespace detail

}  // namespace cpu
}  // namespace faststeal
