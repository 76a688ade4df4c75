// gaussian_kl on the CPU: sum of KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)) as one
// parallel pass with fixed-size chunks summed in double in a fixed order (deterministic
// whatever the thread count), and its elementwise gradient.
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"

namespace faststeal {
namespace cpu {
namespace {

constexpr int64_t kKlChunk = 1 << 13;  // elements per partial sum

}  // namespace

// bfloat16/float16 inputs (is_reduced, csrc/common.h) are computed in float32 (one conversion
// pass; these ops read each element once, so the conversion costs as much as the op) and
// results follow the contract.

at::Tensor gaussian_kl_fwd(const at::Tensor& mu, const at::Tensor& rho, double prior_sigma) {
  const Target t = cpu_target("gaussian_kl_fwd_cpu");
  check_gaussian_kl(t, mu, rho, prior_sigma);
  if (is_reduced(mu)) return gaussian_kl_fwd(mu.to(at::kFloat), rho.to(at::kFloat), prior_sigma);
  const int64_t n = mu.numel();
  const int64_t nchunks = (n + kKlChunk - 1) / kKlChunk;
  std::vector<double> partial(nchunks, 0.0);
  at::Tensor out = alloc({}, mu.options().dtype(acc_dtype(mu.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_fwd_cpu", [&] {
    using acc_t = scalar_t;  // CPU dtypes are float32/float64, their own accumulation type
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rho.data_ptr<scalar_t>();
    const acc_t ps = static_cast<acc_t>(prior_sigma);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double acc = 0.0;
        const int64_t e1 = std::min(n, (c + 1) * kKlChunk);
        for (int64_t i = c * kKlChunk; i < e1; ++i) {
          const acc_t sigma = softplus<acc_t>(static_cast<acc_t>(r[i]));
          const acc_t ratio = sigma / ps, mr = static_cast<acc_t>(m[i]) / ps;
          const acc_t vr = ratio * ratio;
          acc += static_cast<double>(acc_t(0.5) * (vr + mr * mr - acc_t(1) - std::log(vr)));
        }
        partial[c] = acc;
      }
    });
    double total = 0.0;
    for (double p : partial) total += p;
    out.fill_(total);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_bwd(const at::Tensor& grad, const at::Tensor& mu,
                                                   const at::Tensor& rho, double prior_sigma) {
  const Target t = cpu_target("gaussian_kl_bwd_cpu");
  check_gaussian_kl(t, mu, rho, prior_sigma);
  TORCH_CHECK(grad.numel() == 1, t.fn, ": grad must be a scalar, got sizes ", grad.sizes());
  check_device(t, grad, "grad");
  if (is_reduced(mu)) {
    auto [dm, dr] = gaussian_kl_bwd(grad, mu.to(at::kFloat), rho.to(at::kFloat), prior_sigma);
    return {dm.to(mu.scalar_type()), dr.to(rho.scalar_type())};
  }
  const double g = grad.item<double>();
  at::Tensor dmu = alloc_like(mu), drho = alloc_like(rho);
  const int64_t n = mu.numel();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_bwd_cpu", [&] {
    const scalar_t* m = mu.data_ptr<scalar_t>();
    const scalar_t* r = rho.data_ptr<scalar_t>();
    scalar_t* dm = dmu.data_ptr<scalar_t>();
    scalar_t* dr = drho.data_ptr<scalar_t>();
    const scalar_t gs = static_cast<scalar_t>(g);
    const scalar_t inv_var = static_cast<scalar_t>(1.0 / (prior_sigma * prior_sigma));
    at::parallel_for(0, n, kKlChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t sigma = softplus<scalar_t>(r[i]);
        dm[i] = gs * m[i] * inv_var;
        dr[i] = gs * (sigma * inv_var - scalar_t(1) / sigma) * sigmoid<scalar_t>(r[i]);
      }
    });
  });
  return {dmu, drho};
}

}  // namespace cpu
}  // namespace faststeal
