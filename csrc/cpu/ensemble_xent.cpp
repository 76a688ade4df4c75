// ensemble_cross_entropy on the CPU: per-member mean cross-entropy of (S, B, C) logits with hard
// (int64) or soft (probability) targets, one pass per row with max-subtracted log-sum-exp; the
// per-member mean is summed over fixed row chunks in double in a fixed order (deterministic).
// The backward writes (softmax * sum(t) - t) * grad_s / B in one pass per row.
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"

namespace faststeal {
namespace cpu {
namespace {

constexpr int64_t kRowsPerChunk = 256;

// Max and log(sum(exp(x - max))) of one row, in acc precision. Losses and probabilities are
// formed from (x - max) - log(sum), never from max + log(sum), so mean-shifted logits (e.g.
// +1e4) keep full precision.
template <typename T>
inline void row_max_logsum(const T* x, int64_t C, T& m, T& logsum) {
  m = x[0];
  for (int64_t c = 1; c < C; ++c) m = x[c] > m ? x[c] : m;
  T sum = T(0);
  for (int64_t c = 0; c < C; ++c) sum += std::exp(x[c] - m);
  logsum = std::log(sum);
}

inline void check_label(const Target& t, int64_t label, int64_t b, int64_t C) {
  TORCH_CHECK(label >= 0 && label < C, t.fn, ": target[", b, "] = ", label,
              " is not a class index in [0, ", C, ")");
}

}  // namespace

// bfloat16/float16 logits (is_reduced, csrc/common.h) are computed in float32 (one conversion
// pass): the loss is float32 (acc dtype) for them anyway, and the gradient is rounded to the
// logits' dtype once.
static at::Tensor to_float_if(bool soft, const at::Tensor& target) {
  return soft ? target.to(at::kFloat) : target;
}

at::Tensor ensemble_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target) {
  const Target t = cpu_target("ensemble_cross_entropy_fwd_cpu");
  const bool soft = check_ensemble_xent(t, logits, target);
  if (is_reduced(logits)) {
    return ensemble_cross_entropy_fwd(logits.to(at::kFloat), to_float_if(soft, target));
  }
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  const int64_t nchunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(S * nchunks, 0.0);
  at::Tensor out = alloc({S}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ensemble_cross_entropy_fwd_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, S * nchunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t s = k / nchunks, chunk = k % nchunks;
        const int64_t b1 = std::min(B, (chunk + 1) * kRowsPerChunk);
        double acc = 0.0;
        for (int64_t b = chunk * kRowsPerChunk; b < b1; ++b) {
          const scalar_t* row = x + (s * B + b) * C;
          scalar_t m, ls;
          row_max_logsum(row, C, m, ls);
          if (soft) {
            const scalar_t* tr = target.data_ptr<scalar_t>() + b * C;
            scalar_t l = scalar_t(0);
            for (int64_t c = 0; c < C; ++c) l += tr[c] * ((m - row[c]) + ls);
            acc += static_cast<double>(l);
          } else {
            const int64_t label = target.data_ptr<int64_t>()[b];
            check_label(t, label, b, C);
            acc += static_cast<double>((m - row[label]) + ls);
          }
        }
        partial[k] = acc;
      }
    });
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) {
      double tot = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) tot += partial[s * nchunks + c];
      o[s] = static_cast<scalar_t>(B > 0 ? tot / static_cast<double>(B) : NAN);
    }
  });
  return out;
}

at::Tensor ensemble_cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& target) {
  const Target t = cpu_target("ensemble_cross_entropy_bwd_cpu");
  const bool soft = check_ensemble_xent(t, logits, target);
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  check_grad_scalar_per_member(t, grad, S);
  if (is_reduced(logits)) {
    return ensemble_cross_entropy_bwd(grad, logits.to(at::kFloat), to_float_if(soft, target))
        .to(logits.scalar_type());
  }
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  at::Tensor dlogits = alloc_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ensemble_cross_entropy_bwd_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* dx = dlogits.data_ptr<scalar_t>();
    const double* gp = g.data_ptr<double>();
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
    at::parallel_for(0, S * B, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t s = r / B, b = r % B;
        const scalar_t* row = x + r * C;
        scalar_t* drow = dx + r * C;
        scalar_t m, ls;
        row_max_logsum(row, C, m, ls);
        const scalar_t w = static_cast<scalar_t>(gp[s] / static_cast<double>(B));
        if (soft) {
          const scalar_t* tr = target.data_ptr<scalar_t>() + b * C;
          scalar_t tsum = scalar_t(0);
          for (int64_t c = 0; c < C; ++c) tsum += tr[c];
          for (int64_t c = 0; c < C; ++c) {
            drow[c] = (std::exp((row[c] - m) - ls) * tsum - tr[c]) * w;
          }
        } else {
          const int64_t label = target.data_ptr<int64_t>()[b];
          check_label(t, label, b, C);
          for (int64_t c = 0; c < C; ++c) drow[c] = std::exp((row[c] - m) - ls) * w;
          drow[label] = (std::exp((row[label] - m) - ls) - scalar_t(1)) * w;
        }
      }
    });
  });
  return dlogits;
}

}  // namespace cpu
}  // namespace faststeal
