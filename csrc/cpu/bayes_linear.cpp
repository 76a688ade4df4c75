// bayes_linear on the CPU.
//
// eps is drawn from the counter RNG (stream keys from the host) inside the op: the
// forward samples the S weight matrices into a buffer that lives only for the GEMM, the backward
// regenerates the same eps (nothing random is stored between forward and backward) and reduces
// dW_s into dmu / drho in one fused pass.
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

namespace faststeal {
namespace cpu {
namespace {

// W[s,n,k] = mu[n,k] + softplus(rho[n,k]) * eps(key, (s*N + n)*K + k); optionally eps into E.
// eps(key, c0 + j) for j in [0, n) (counters modulo 2**32, as everywhere) into out. Compiled for
// AVX2 and for the baseline ISA, picked at load time: the hash and the polynomial Box-Muller of
// normal_fast vectorize 8-wide under AVX2 (the baseline x86-64 has no 32-bit vector multiply).
FS_CLONES_AVX2
void normal_fill(uint32_t key, uint32_t c0, int64_t n, float* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = normal_fast(key, c0 + static_cast<uint32_t>(j));
}

// W[s,n,k] = mu[n,k] + softplus(rho[n,k]) * eps(key, (s*N + n)*K + k); optionally eps into E.
template <typename T>
void sample_weights(const T* mu, const T* rho, T* W, T* E, int64_t S, int64_t N, int64_t K,
                    uint32_t key) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K * S, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<T> sp(K);
    std::vector<float> eps(K);  // eps is a float32 sample (the reference draws it in float32)
    for (int64_t n = n0; n < n1; ++n) {
      const T* m = mu + n * K;
      const T* r = rho + n * K;
      for (int64_t k = 0; k < K; ++k) sp[k] = softplus<T>(r[k]);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = (s * N + n) * K;
        normal_fill(key, static_cast<uint32_t>(off), K, eps.data());
        T* __restrict__ w = W + off;
        for (int64_t k = 0; k < K; ++k) w[k] = m[k] + sp[k] * static_cast<T>(eps[k]);
        if (E) {
          for (int64_t k = 0; k < K; ++k) E[off + k] = static_cast<T>(eps[k]);
        }
      }
    }
  });
}

template <typename T>
void sample_bias(const T* mu, const T* rho, T* b, int64_t S, int64_t N, uint32_t key) {
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t n = 0; n < N; ++n) {
      const T e = static_cast<T>(normal_fast(key, static_cast<uint64_t>(s * N + n)));
      b[s * N + n] = mu[n] + softplus<T>(rho[n]) * e;
    }
  }
}

// bfloat16/float16 inputs: the weights are sampled and the gradients reduced in float32 from
// float32 copies of mu and rho, and only the GEMM operands are in the input dtype (the GEMMs
// accumulate in float32); the results are rounded to the input dtype once.
at::Tensor work(const at::Tensor& t) { return is_reduced(t) ? t.to(at::kFloat) : t; }
OptTensor work(const OptTensor& t) {
  return t.has_value() ? OptTensor(work(*t)) : OptTensor();
}

}  // namespace

at::Tensor bayes_linear_fwd(const at::Tensor& x, const at::Tensor& w_mu_in,
                            const at::Tensor& w_rho_in, const OptTensor& b_mu_in,
                            const OptTensor& b_rho_in, int64_t samples, int64_t key_w,
                            int64_t key_b) {
  const Target t = cpu_target("bayes_linear_fwd_cpu");
  const LinearDims d = check_bayes_linear(t, x, w_mu_in, w_rho_in, b_mu_in, b_rho_in, samples);
  const uint32_t kw = check_key(t, key_w, "key_w");
  const uint32_t kb = check_key(t, key_b, "key_b");
  const at::Tensor w_mu = work(w_mu_in), w_rho = work(w_rho_in);
  const OptTensor b_mu = work(b_mu_in), b_rho = work(b_rho_in);
  at::Tensor W = alloc({d.S, d.N, d.K}, w_mu.options());  // freed when the op returns
  OptTensor b;
  if (b_mu.has_value()) b = alloc({d.S, d.N}, w_mu.options());
  AT_DISPATCH_FLOATING_TYPES(w_mu.scalar_type(), "bayes_linear_fwd_cpu", [&] {
    sample_weights<scalar_t>(w_mu.data_ptr<scalar_t>(), w_rho.data_ptr<scalar_t>(),
                             W.data_ptr<scalar_t>(), nullptr, d.S, d.N, d.K, kw);
    if (b.has_value()) {
      sample_bias<scalar_t>(b_mu->data_ptr<scalar_t>(), b_rho->data_ptr<scalar_t>(),
                            b->data_ptr<scalar_t>(), d.S, d.N, kb);
    }
  });
  if (is_reduced(x)) {
    W = W.to(x.scalar_type());
    if (b.has_value()) b = b->to(x.scalar_type());
  }
  return detail::stacked_linear(x, W, b, /*relu=*/false);
}

std::vector<at::Tensor> bayes_linear_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& w_mu_in, const at::Tensor& w_rho_in,
                                         const OptTensor& b_mu_in, const OptTensor& b_rho_in,
                                         int64_t samples, int64_t key_w, int64_t key_b,
                                         bool need_dx) {
  const Target t = cpu_target("bayes_linear_bwd_cpu");
  const LinearDims d = check_bayes_linear(t, x, w_mu_in, w_rho_in, b_mu_in, b_rho_in, samples);
  const at::Tensor w_mu = work(w_mu_in), w_rho = work(w_rho_in);
  const OptTensor b_mu = work(b_mu_in), b_rho = work(b_rho_in);
  const bool red = is_reduced(x);
  check_float(t, grad_y, "grad_y", {3});
  check_like(t, grad_y, "grad_y", x, "x");
  TORCH_CHECK(grad_y.size(0) == d.S && grad_y.size(1) == d.B && grad_y.size(2) == d.N, t.fn,
              ": grad_y must be (samples, batch, out_features) = (", d.S, ", ", d.B, ", ", d.N,
              "), got sizes ", grad_y.sizes());
  const uint32_t kw = check_key(t, key_w, "key_w");
  const uint32_t kb = check_key(t, key_b, "key_b");
  const int64_t S = d.S, B = d.B, N = d.N, K = d.K;

  // Regenerate eps (E) and the sampled weights (W); after dx, W is replaced by dW.
  at::Tensor W = alloc({S, N, K}, w_mu.options());
  at::Tensor E = alloc({S, N, K}, w_mu.options());
  AT_DISPATCH_FLOATING_TYPES(w_mu.scalar_type(), "bayes_linear_bwd_cpu", [&] {
    sample_weights<scalar_t>(w_mu.data_ptr<scalar_t>(), w_rho.data_ptr<scalar_t>(),
                             W.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), S, N, K, kw);
  });
  at::Tensor dx = x.new_empty({0});
  const at::Tensor Wg = red ? W.to(x.scalar_type()) : W;  // the GEMM operand
  if (d.shared) {
    // dx = sum_s g_s @ W_s and dW_s = g_s^T @ x are single GEMMs over g as (B, S*N).
    const at::Tensor g2 = grad_y.permute({1, 0, 2}).contiguous().view({B, S * N});
    if (need_dx) dx = detail::mm(g2, Wg.view({S * N, K}));
    if (red) {
      W = detail::mm(g2.t(), x).to(at::kFloat).view({S, N, K});
    } else {
      at::Tensor W2 = W.view({S * N, K});
      at::mm_out(W2, g2.t(), x);
    }
  } else {
    if (need_dx) dx = detail::stacked_linear(grad_y, Wg.transpose(1, 2), std::nullopt, false);
    W = detail::stacked_linear(grad_y.transpose(1, 2), x.transpose(1, 2), std::nullopt, false);
    if (red) W = W.to(at::kFloat);
  }
  at::Tensor dmu = alloc_like(w_mu), drho = alloc_like(w_rho);
  AT_DISPATCH_FLOATING_TYPES(w_mu.scalar_type(), "bayes_linear_bwd_cpu", [&] {
    const scalar_t* dW = W.data_ptr<scalar_t>();
    const scalar_t* e = E.data_ptr<scalar_t>();
    const scalar_t* rho = w_rho.data_ptr<scalar_t>();
    scalar_t* dm = dmu.data_ptr<scalar_t>();
    scalar_t* dr = drho.data_ptr<scalar_t>();
    // dmu = sum_s dW_s; drho = sigmoid(rho) * sum_s dW_s * eps_s (w = mu + softplus(rho) eps).
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * S, 1)),
                     [&](int64_t n0, int64_t n1) {
      std::vector<double> am(K), ar(K);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(am.begin(), am.end(), 0.0);
        std::fill(ar.begin(), ar.end(), 0.0);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t off = (s * N + n) * K;
          for (int64_t k = 0; k < K; ++k) {
            am[k] += static_cast<double>(dW[off + k]);
            ar[k] += static_cast<double>(dW[off + k]) * static_cast<double>(e[off + k]);
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          dm[n * K + k] = static_cast<scalar_t>(am[k]);
          dr[n * K + k] = static_cast<scalar_t>(ar[k]) * sigmoid<scalar_t>(rho[n * K + k]);
        }
      }
    });
  });
  W.reset();
  E.reset();

  at::Tensor dbmu = x.new_empty({0}), dbrho = x.new_empty({0});
  if (b_mu.has_value()) {
    const at::Tensor gsum = grad_y.sum(1, false, at::kDouble).contiguous();  // (S, N)
    dbmu = alloc_like(*b_mu);
    dbrho = alloc_like(*b_rho);
    AT_DISPATCH_FLOATING_TYPES(b_mu->scalar_type(), "bayes_linear_bwd_cpu", [&] {
      const double* gs = gsum.data_ptr<double>();
      const scalar_t* rho = b_rho->data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n) {
        double m = 0.0, r = 0.0;
        for (int64_t s = 0; s < S; ++s) {
          const float e = normal_fast(kb, static_cast<uint64_t>(s * N + n));
          m += gs[s * N + n];
          r += gs[s * N + n] * static_cast<double>(static_cast<scalar_t>(e));
        }
        dbmu.data_ptr<scalar_t>()[n] = static_cast<scalar_t>(m);
        dbrho.data_ptr<scalar_t>()[n] = static_cast<scalar_t>(r) * sigmoid<scalar_t>(rho[n]);
      }
    });
  }
  if (red) {
    const auto dt = x.scalar_type();
    dmu = dmu.to(dt);
    drho = drho.to(dt);
    if (b_mu.has_value()) {
      dbmu = dbmu.to(dt);
      dbrho = dbrho.to(dt);
    }
  }
  return {dx, dmu, drho, dbmu, dbrho};
}

}  // namespace cpu
}  // namespace faststeal
