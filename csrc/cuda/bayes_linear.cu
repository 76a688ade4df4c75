// bayes_linear on CUDA. eps is generated in-kernel from the counter RNG (keys from the host) and
// never stored: the forward writes the sampled weights mu + softplus(rho) * eps into a buffer
// that lives only for the cuBLAS GEMM; the backward regenerates them for dx, reuses the buffer
// for dW, and a reduction kernel regenerates eps again to form dmu = sum_s dW_s and
// drho = sigmoid(rho) * sum_s dW_s * eps_s.
#include "cuda_common.cuh"
#include "ops_cuda.h"

namespace faststeal {
namespace gpu {
namespace {

constexpr int kThreads = 256;

// W[s,n,k] = mu[n,k] + softplus(rho[n,k]) * eps(key, (s*N + n)*K + k) for all S*NK elements.
template <typename T>
__global__ void sample_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                              T* __restrict__ W, int64_t S, int64_t NK, uint32_t key) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = S * NK;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % NK;
    // eps is a float32 sample, rounded to the storage dtype as the reference does.
    const acc_t e = to_acc(static_cast<T>(normal_dev(key, static_cast<uint64_t>(i))));
    W[i] = static_cast<T>(to_acc(mu[j]) + softplus<acc_t>(to_acc(rho[j])) * e);
  }
}

// dmu[j] = sum_s dW[s, j]; drho[j] = sigmoid(rho[j]) * sum_s dW[s, j] * eps(key, s*NK + j).
// For the bias (NK = N) dW is the row-summed grad (S, N) in acc precision.
template <typename T, typename G>
__global__ void reduce_kernel(const G* __restrict__ dW, const T* __restrict__ rho,
                              T* __restrict__ dmu, T* __restrict__ drho, int64_t S, int64_t NK,
                              uint32_t key) {
  using acc_t = typename Acc<T>::type;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < NK;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t m = 0, r = 0;
    for (int64_t s = 0; s < S; ++s) {
      const acc_t g = static_cast<acc_t>(dW[s * NK + j]);
      const acc_t e = to_acc(static_cast<T>(normal_dev(key, static_cast<uint64_t>(s * NK + j))));
      m += g;
      r += g * e;
    }
    dmu[j] = static_cast<T>(m);
    drho[j] = static_cast<T>(r * sigmoid<acc_t>(to_acc(rho[j])));
  }
}

template <typename T>
void sample(const at::Tensor& mu, const at::Tensor& rho, at::Tensor& W, int64_t S,
            uint32_t key) {
  const int64_t NK = mu.numel();
  if (S * NK == 0) return;
  sample_kernel<T><<<blocks_for(S * NK, kThreads), kThreads, 0, stream()>>>(
      mu.data_ptr<T>(), rho.data_ptr<T>(), W.data_ptr<T>(), S, NK, key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename G>
void reduce(const at::Tensor& dW, const at::Tensor& rho, at::Tensor& dmu, at::Tensor& drho,
            int64_t S, uint32_t key) {
  const int64_t NK = rho.numel();
  if (NK == 0) return;
  reduce_kernel<T, G><<<blocks_for(NK, kThreads), kThreads, 0, stream()>>>(
      dW.data_ptr<G>(), rho.data_ptr<T>(), dmu.data_ptr<T>(), drho.data_ptr<T>(), S, NK, key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor batched_x(const at::Tensor& x, int64_t S) {
  return x.dim() == 2 ? x.unsqueeze(0).expand({S, x.size(0), x.size(1)}) : x;
}

}  // namespace

at::Tensor bayes_linear_fwd(const at::Tensor& x, const at::Tensor& w_mu, const at::Tensor& w_rho,
                            const OptTensor& b_mu, const OptTensor& b_rho, int64_t samples,
                            int64_t key_w, int64_t key_b) {
  const Target t = cuda_target("bayes_linear_fwd_cuda");
  const LinearDims d = check_bayes_linear(t, x, w_mu, w_rho, b_mu, b_rho, samples);
  const uint32_t kw = check_key(t, key_w, "key_w");
  const uint32_t kb = check_key(t, key_b, "key_b");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor W = alloc({d.S, d.N, d.K}, x.options());  // freed when the op returns
  at::Tensor b;
  FS_DISPATCH_CUDA(x.scalar_type(), "bayes_linear_fwd_cuda", [&] {
    sample<scalar_t>(w_mu, w_rho, W, d.S, kw);
    if (b_mu.has_value()) {
      b = alloc({d.S, d.N}, x.options());
      sample<scalar_t>(*b_mu, *b_rho, b, d.S, kb);
    }
  });
  at::Tensor y = alloc({d.S, d.B, d.N}, x.options());
  if (b_mu.has_value()) at::baddbmm_out(y, b.unsqueeze(1), batched_x(x, d.S), W.transpose(1, 2));
  else at::bmm_out(y, batched_x(x, d.S), W.transpose(1, 2));
  return y;
}

std::vector<at::Tensor> bayes_linear_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& w_mu, const at::Tensor& w_rho,
                                         const OptTensor& b_mu, const OptTensor& b_rho,
                                         int64_t samples, int64_t key_w, int64_t key_b,
                                         bool need_dx) {
  const Target t = cuda_target("bayes_linear_bwd_cuda");
  const LinearDims d = check_bayes_linear(t, x, w_mu, w_rho, b_mu, b_rho, samples);
  check_float(t, grad_y, "grad_y", {3});
  check_like(t, grad_y, "grad_y", x, "x");
  TORCH_CHECK(grad_y.size(0) == d.S && grad_y.size(1) == d.B && grad_y.size(2) == d.N, t.fn,
              ": grad_y must be (samples, batch, out_features) = (", d.S, ", ", d.B, ", ", d.N,
              "), got sizes ", grad_y.sizes());
  const uint32_t kw = check_key(t, key_w, "key_w");
  const uint32_t kb = check_key(t, key_b, "key_b");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = d.S, B = d.B, N = d.N, K = d.K;

  at::Tensor W = alloc({S, N, K}, x.options());
  at::Tensor dx = x.new_empty({0});
  at::Tensor dmu = alloc_like(w_mu), drho = alloc_like(w_rho);
  FS_DISPATCH_CUDA(x.scalar_type(), "bayes_linear_bwd_cuda", [&] {
    sample<scalar_t>(w_mu, w_rho, W, S, kw);
    if (d.shared) {
      // dx = sum_s g_s @ W_s and dW_s = g_s^T @ x as single GEMMs over g as (B, S*N).
      const at::Tensor g2 = grad_y.permute({1, 0, 2}).contiguous().view({B, S * N});
      at::Tensor W2 = W.view({S * N, K});
      if (need_dx) dx = at::mm(g2, W2);
      at::mm_out(W2, g2.t(), x);
    } else {
      if (need_dx) dx = at::bmm(grad_y, W);
      at::bmm_out(W, grad_y.transpose(1, 2), x);
    }
    reduce<scalar_t, scalar_t>(W, w_rho, dmu, drho, S, kw);
  });
  W.reset();

  at::Tensor dbmu = x.new_empty({0}), dbrho = x.new_empty({0});
  if (b_mu.has_value()) {
    const at::ScalarType acc = acc_dtype(x.scalar_type());
    const at::Tensor gsum = grad_y.sum(1, false, acc).contiguous();  // (S, N)
    dbmu = alloc_like(*b_mu);
    dbrho = alloc_like(*b_rho);
    FS_DISPATCH_CUDA(x.scalar_type(), "bayes_linear_bwd_cuda", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      reduce<scalar_t, acc_t>(gsum, *b_rho, dbmu, dbrho, S, kb);
    });
  }
  return {dx, dmu, drho, dbmu, dbrho};
}

}  // namespace gpu
}  // namespace faststeal
