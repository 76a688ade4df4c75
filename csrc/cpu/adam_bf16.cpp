// adam_bf16_step on the CPU: torch.optim.Adam's update of float32 master parameters (a list, one
// parallel pass over all of them) from bfloat16 gradients (plus, optionally, float32 ones),
// writing each parameter's bfloat16 working copy in the same pass (faststeal/master_weights.py:
// bf16 training without the two cast passes per step).
//
// The arithmetic is that of the vector loop of ATen's fused CPU Adam
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, float32, mode ORIGINAL) as the torch wheels
// compile it for AVX2 / AVX-512, where GCC in GNU mode contracts its multiply-adds into FMAs.
// Per element:
//   g = grad_bf16 (+ grad_f32);  g = fma(p, weight_decay, g) (skipped at 0)
//   m = lerp(m, g, w = 1 - beta1) = fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
//   v = fma((1 - beta2) * g, g, v * beta2)
//   p = p - (step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)
//   copy = bfloat16(p), rounded to nearest even (a NaN becomes 0x7FC0, c10's rule)
// with step_size = lr / bias_correction1 and the bias corrections of `step` in double. On a
// tensor whose length is a multiple of ATen's vector width (16 floats under AVX-512, 8 under
// AVX2) the update is bit-identical to torch.optim.Adam(fused=True) on the float32 sum of the
// gradients; ATen computes the last numel % width elements with other roundings, so
// faststeal/master_weights.py hands those to torch itself (tests/test_master_weights.py). The FMAs
// are explicit std::fma: vfmadd in the AVX2+FMA build, a correctly rounded libm call in the
// baseline one (slower, the same bits); this file is compiled in ISO C++ mode, where GCC
// contracts nothing.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

namespace faststeal {
namespace cpu {
namespace {

constexpr int64_t kAdamGrain = 1 << 15;  // elements per parallel task

struct AdamArgs {
  float w, w_minus_1, beta2, c2, weight_decay, eps, step_size, bc2_sqrt;
  bool lerp_small;
};

// float -> bfloat16 bits, round to nearest even; any NaN becomes the quiet 0x7FC0 (c10's rule)
FS_INLINE uint16_t to_bf16_rne(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = nan_mask(x);
  return static_cast<uint16_t>((r & ~nan) | (0x7FC0u & nan));
}

// The loop over elements [i0, i1), one instantiation per case (no test inside the loop, so that
// GCC vectorizes it): kF32 a float32 gradient is added, kDecay weight_decay != 0, kSmall w < 0.5.
template <bool kF32, bool kDecay, bool kSmall>
FS_INLINE void adam_loop(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                         const uint16_t* __restrict__ gb, const float* __restrict__ gf,
                         uint16_t* __restrict__ copy, int64_t i0, int64_t i1, const AdamArgs a) {
  const float w = kSmall ? a.w : a.w_minus_1, beta2 = a.beta2, c2 = a.c2, wd = a.weight_decay;
  const float eps = a.eps, step_size = a.step_size, bc2_sqrt = a.bc2_sqrt;
  for (int64_t i = i0; i < i1; ++i) {
    float g = bits_to_float(static_cast<uint32_t>(gb[i]) << 16);
    if constexpr (kF32) g += gf[i];
    const float pi = p[i];
    if constexpr (kDecay) g = std::fma(pi, wd, g);  // skipped at 0, as in ATen
    const float mi = m[i];
    const float mn = std::fma(w, g - mi, kSmall ? mi : g);
    const float vn = std::fma(c2 * g, g, v[i] * beta2);
    m[i] = mn;
    v[i] = vn;
    const float pn = pi - (step_size * mn) / (std::sqrt(vn) / bc2_sqrt + eps);
    p[i] = pn;
    copy[i] = to_bf16_rne(pn);
  }
}

template <bool kF32, bool kDecay>
FS_INLINE void adam_span2(float* p, float* m, float* v, const uint16_t* gb, const float* gf,
                          uint16_t* copy, int64_t i0, int64_t i1, const AdamArgs& a) {
  if (a.lerp_small) {
    adam_loop<kF32, kDecay, true>(p, m, v, gb, gf, copy, i0, i1, a);
  } else {
    adam_loop<kF32, kDecay, false>(p, m, v, gb, gf, copy, i0, i1, a);
  }
}

FS_INLINE void adam_span(float* p, float* m, float* v, const uint16_t* gb, const float* gf,
                         uint16_t* copy, int64_t i0, int64_t i1, const AdamArgs& a) {
  const bool decay = a.weight_decay != 0.0f;
  if (gf != nullptr) {
    decay ? adam_span2<true, true>(p, m, v, gb, gf, copy, i0, i1, a)
          : adam_span2<true, false>(p, m, v, gb, gf, copy, i0, i1, a);
  } else {
    decay ? adam_span2<false, true>(p, m, v, gb, gf, copy, i0, i1, a)
          : adam_span2<false, false>(p, m, v, gb, gf, copy, i0, i1, a);
  }
}

using SpanFn = void (*)(float*, float*, float*, const uint16_t*, const float*, uint16_t*, int64_t,
                        int64_t, const AdamArgs&);

void adam_base(float* p, float* m, float* v, const uint16_t* gb, const float* gf, uint16_t* copy,
               int64_t i0, int64_t i1, const AdamArgs& a) {
  adam_span(p, m, v, gb, gf, copy, i0, i1, a);
}

#ifdef FS_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void adam_avx2(float* p, float* m, float* v, const uint16_t* gb, const float* gf, uint16_t* copy,
               int64_t i0, int64_t i1, const AdamArgs& a) {
  adam_span(p, m, v, gb, gf, copy, i0, i1, a);
}
#pragma GCC pop_options
#endif

SpanFn adam_span_fn() {
#ifdef FS_X86_GCC
  if (cpu_has_avx2_fma()) return &adam_avx2;
#endif
  return &adam_base;
}

// x is argument `name`[i] of parameter i (params[i]): dtype, params[i]'s shape, contiguous
void check_state(const Target& t, const at::Tensor& x, const std::string& name, size_t i,
                 at::ScalarType dtype, const at::Tensor& param) {
  const std::string label = name + "[" + std::to_string(i) + "]";
  check_device(t, x, label.c_str());
  TORCH_CHECK(x.scalar_type() == dtype, t.fn, ": ", label, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.sizes() == param.sizes(), t.fn, ": ", label, " must have params[", i,
              "]'s shape ", param.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), t.fn, ": ", label, " must be contiguous");
}

}  // namespace

void adam_bf16_step(const std::vector<at::Tensor>& params,
                    const std::vector<at::Tensor>& grads_bf16,
                    const std::vector<OptTensor>& grads_f32,
                    const std::vector<at::Tensor>& exp_avgs,
                    const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<at::Tensor>& copies, const std::vector<int64_t>& steps,
                    const std::vector<int64_t>& counts, double lr, double beta1, double beta2,
                    double eps, double weight_decay) {
  const Target t = cpu_target("adam_bf16_step_cpu");
  const size_t n = params.size();
  TORCH_CHECK(grads_bf16.size() == n && grads_f32.size() == n && exp_avgs.size() == n &&
                  exp_avg_sqs.size() == n && copies.size() == n && steps.size() == n &&
                  counts.size() == n,
              t.fn, ": params, grads_bf16, grads_f32, exp_avgs, exp_avg_sqs, copies, steps and ",
              "counts must be lists of one length, got ", n, ", ", grads_bf16.size(), ", ",
              grads_f32.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
              copies.size(), ", ", steps.size(), " and ", counts.size());
  TORCH_CHECK(lr >= 0.0, t.fn, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, t.fn,
              ": betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK(eps >= 0.0, t.fn, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, t.fn, ": weight_decay must be >= 0, got ", weight_decay);

  struct Job {
    float *p, *m, *v;
    const uint16_t* gb;
    const float* gf;
    uint16_t* c;
    AdamArgs a;
  };
  std::vector<Job> jobs;
  std::vector<int64_t> starts{0};  // job i owns [starts[i], starts[i + 1]) of the joined range
  jobs.reserve(n);
  const float w = static_cast<float>(1.0 - beta1);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    check_state(t, param, "params", i, at::kFloat, param);
    check_state(t, grads_bf16[i], "grads_bf16", i, at::kBFloat16, param);
    if (grads_f32[i].has_value()) check_state(t, *grads_f32[i], "grads_f32", i, at::kFloat, param);
    check_state(t, exp_avgs[i], "exp_avgs", i, at::kFloat, param);
    check_state(t, exp_avg_sqs[i], "exp_avg_sqs", i, at::kFloat, param);
    check_state(t, copies[i], "copies", i, at::kBFloat16, param);
    TORCH_CHECK(steps[i] >= 1, t.fn, ": steps[", i, "] must be >= 1 (the count including this ",
                "update), got ", steps[i]);
    TORCH_CHECK(counts[i] >= 0 && counts[i] <= param.numel(), t.fn, ": counts[", i,
                "] must be in [0, ", param.numel(), "] (params[", i, "]'s elements), got ",
                counts[i]);
    // the kernel's pointers are __restrict__: the written tensors must not share memory with
    // any other argument of the same parameter (different parameters must not overlap either:
    // their updates run concurrently; MasterWeights passes each parameter once)
    const at::Tensor* written[] = {&param, &exp_avgs[i], &exp_avg_sqs[i], &copies[i]};
    const at::Tensor* all[] = {&param, &exp_avgs[i], &exp_avg_sqs[i], &copies[i], &grads_bf16[i],
                               grads_f32[i].has_value() ? &*grads_f32[i] : nullptr};
    for (const at::Tensor* wr : written) {
      for (const at::Tensor* o : all) {
        if (o != nullptr && o != wr) at::assert_no_overlap(*wr, *o);
      }
    }
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(steps[i]));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(steps[i]));
    const AdamArgs a{w,
                     w - 1.0f,
                     static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2),
                     static_cast<float>(weight_decay),
                     static_cast<float>(eps),
                     static_cast<float>(lr / bc1),
                     static_cast<float>(std::sqrt(bc2)),
                     std::abs(w) < 0.5f};
    jobs.push_back({param.data_ptr<float>(), exp_avgs[i].data_ptr<float>(),
                    exp_avg_sqs[i].data_ptr<float>(),
                    reinterpret_cast<const uint16_t*>(grads_bf16[i].data_ptr<at::BFloat16>()),
                    grads_f32[i].has_value() ? grads_f32[i]->data_ptr<float>() : nullptr,
                    reinterpret_cast<uint16_t*>(copies[i].data_ptr<at::BFloat16>()), a});
    starts.push_back(starts.back() + counts[i]);
  }
  // one parallel region over all the parameters joined end to end: the threads get equal
  // numbers of elements (a single tensor splits as a call of its own would)
  const SpanFn run = adam_span_fn();
  at::parallel_for(0, starts.back(), kAdamGrain, [&](int64_t e0, int64_t e1) {
    // the job holding element e0, then each job the range overlaps
    size_t j = std::upper_bound(starts.begin(), starts.end(), e0) - starts.begin() - 1;
    for (; j < jobs.size() && starts[j] < e1; ++j) {
      const Job& job = jobs[j];
      const int64_t i0 = std::max(e0, starts[j]) - starts[j];
      const int64_t i1 = std::min(e1, starts[j + 1]) - starts[j];
      if (i0 < i1) run(job.p, job.m, job.v, job.gb, job.gf, job.c, i0, i1, job.a);
    }
  });
}

}  // namespace cpu
}  // namespace faststeal
