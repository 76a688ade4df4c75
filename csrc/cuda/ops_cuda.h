// CUDA entry points of faststeal._C (bound in bind_cuda.cpp as <op>_<fwd|bwd>_cuda). Same
// signatures as the CPU ones in csrc/ops.h; float32, float16, bfloat16 (fp32 accumulation) and
// float64.
#pragma once

#include "../ops.h"

namespace faststeal {
namespace gpu {

std::tuple<at::Tensor, at::Tensor> ensemble_linear_fwd(const at::Tensor& x,
                                                       const at::Tensor& weight,
                                                       const OptTensor& bias,
                                                       const std::string& activation,
                                                       double dropout_p, int64_t key);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const at::Tensor& y, const at::Tensor& z,
    const std::string& activation, double dropout_p, int64_t key, bool need_dx);

at::Tensor bayes_linear_fwd(const at::Tensor& x, const at::Tensor& w_mu, const at::Tensor& w_rho,
                            const OptTensor& b_mu, const OptTensor& b_rho, int64_t samples,
                            int64_t key_w, int64_t key_b);
std::vector<at::Tensor> bayes_linear_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& w_mu, const at::Tensor& w_rho,
                                         const OptTensor& b_mu, const OptTensor& b_rho,
                                         int64_t samples, int64_t key_w, int64_t key_b,
                                         bool need_dx);

at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, double prior_sigma);
std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad, const at::Tensor& mu,
                                                   const at::Tensor& rho, double prior_sigma);

std::vector<at::Tensor> member_stats_fwd(const at::Tensor& logits, const OptTensor& targets);

at::Tensor ensemble_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target);
at::Tensor ensemble_cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& target);

}  // namespace gpu
}  // namespace faststeal
