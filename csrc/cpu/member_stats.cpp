// member_stats on the CPU: every across-member statistic of (S, B, C) logits in one pass over
// the logits, parallel over batch rows, with no temporaries beyond an (S, C) scratch per thread.
//
// Numerics: logits are read as float32 (as the reference does); each member's softmax subtracts
// its row max, so large or mean-shifted logits (e.g. +1e4) are exact to float32 rounding; the
// variance across members is two-pass on the probabilities of a block of rows held in a
// per-thread scratch (S x rows x C floats, <= 64 KiB for small C), never E[p^2] - E[p]^2.
// Non-finite logits follow the reference: a NaN or +inf in a member's row makes x - max NaN for
// that row (inf - inf), so its sum, probabilities and every statistic of the batch row are NaN,
// and the argmax loops (strict >) leave a NaN row at class 0, torch.argmax's first NaN; the row's
// probabilities are all NaN or none, so no mixed case arises. -inf logits have probability 0.
#include <ATen/Parallel.h>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

namespace faststeal {
namespace cpu {
namespace {

// Rows per block: enough for long vector loops, few enough that the (S, rows, C) probabilities
// stay in L1/L2. Every output is per row or an integer count, so results do not depend on it.
inline int64_t rows_per_block(int64_t S, int64_t C) {
  return std::max<int64_t>(1, std::min<int64_t>(64, 16384 / std::max<int64_t>(S * C, 1)));
}

struct Outs {
  float* mean_probs;
  float* variance;
  float* entropy_of_mean;
  float* mean_entropy;
  float* mutual_info;
  int64_t* pred;
  float* disagreement;
  float* correct;         // null without targets
  int64_t* member_hits;   // (nblocks, S) counts, null without targets
};

// Statistics of batch rows [b0, b0 + R): P holds the (S, R, C) member probabilities, X one
// member's (R, C) max-subtracted logits plus 2R scratch, H and member_pred (R) and (S, R).
template <typename T>
void stats_block(const T* logits, const int64_t* targets, const Outs& o, int64_t blk, int64_t rpb,
                 int64_t S, int64_t B, int64_t C, float* P, float* X, float* H,
                 int64_t* member_pred) {
  const int64_t b0 = blk * rpb, R = std::min(B, b0 + rpb) - b0;
  int64_t* hits = o.member_hits ? o.member_hits + blk * S : nullptr;
  if (hits) std::fill(hits, hits + S, int64_t(0));
  const float inv_s = 1.0f / static_cast<float>(S);
  std::fill(H, H + R, 0.0f);
  for (int64_t s = 0; s < S; ++s) {
    const T* src = logits + (s * B + b0) * C;  // member s, rows b0.., contiguous (R, C)
    float* p = P + s * R * C;
    for (int64_t r = 0; r < R; ++r) {
      const T* row = src + r * C;
      float m = static_cast<float>(row[0]);
      for (int64_t c = 1; c < C; ++c) {
        const float v = static_cast<float>(row[c]);
        m = v > m ? v : m;
      }
      for (int64_t c = 0; c < C; ++c) X[r * C + c] = static_cast<float>(row[c]) - m;
    }
    for (int64_t i = 0; i < R * C; ++i) p[i] = exp_nonpos(X[i]);  // vectorized
    float* sums = X + R * C;  // scratch (R)
    float* pxs = sums + R;    // scratch (R)
    for (int64_t r = 0; r < R; ++r) {
      float* pr = p + r * C;
      const float* xr = X + r * C;
      float sum = 0.0f;
      for (int64_t c = 0; c < C; ++c) sum += pr[c];
      const float inv = 1.0f / sum;
      float px = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        pr[c] *= inv;
        // 0 log 0 = 0: a class of probability 0 (x = -inf, or a gap beyond -87) adds nothing
        // rather than 0 * -inf = NaN; a NaN p (bits != 0) is kept
        px += select_bits(float_to_bits(pr[c]) != 0u, pr[c] * xr[c]);
      }
      int64_t arg = 0;  // first index among ties (strict >)
      for (int64_t c = 1; c < C; ++c) arg = pr[c] > pr[arg] ? c : arg;
      member_pred[s * R + r] = arg;
      sums[r] = sum;
      pxs[r] = px;
    }
    // H[p_s] = -sum p log p with log p = (x - m) - log(sum).
    for (int64_t r = 0; r < R; ++r) H[r] += log_pos(sums[r]) - pxs[r];
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = b0 + r;
    // Mean and two-pass variance across members, entropy of the mean, ensemble argmax.
    float* mp = o.mean_probs + b * C;
    for (int64_t c = 0; c < C; ++c) mp[c] = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float* pr = P + (s * R + r) * C;
      for (int64_t c = 0; c < C; ++c) mp[c] += pr[c];
    }
    for (int64_t c = 0; c < C; ++c) mp[c] *= inv_s;
    float* sq = X;  // scratch (C)
    for (int64_t c = 0; c < C; ++c) sq[c] = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float* pr = P + (s * R + r) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float d = pr[c] - mp[c];
        sq[c] += d * d;
      }
    }
    float var_sum = 0.0f, eom = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      var_sum += sq[c];
      eom -= mp[c] * log_pos(mp[c]);  // xlogy: 0 log 0 = 0
    }
    int64_t pred = 0;
    for (int64_t c = 1; c < C; ++c) pred = mp[c] > mp[pred] ? c : pred;
    const float me = H[r] * inv_s;
    o.variance[b] = var_sum * inv_s / static_cast<float>(C);
    o.entropy_of_mean[b] = eom;
    o.mean_entropy[b] = me;
    const float mi = eom - me;
    o.mutual_info[b] = mi < 0.0f ? 0.0f : mi;  // >= 0 (the entropies round differently); NaN kept
    o.pred[b] = pred;
    int64_t disagree = 0;
    for (int64_t s = 0; s < S; ++s) disagree += member_pred[s * R + r] != pred;
    o.disagreement[b] = static_cast<float>(disagree) * inv_s;
    if (targets) {
      const int64_t tb = targets[b];
      o.correct[b] = pred == tb ? 1.0f : 0.0f;
      for (int64_t s = 0; s < S; ++s) hits[s] += member_pred[s * R + r] == tb;
    }
  }
}

}  // namespace

std::vector<at::Tensor> member_stats_fwd(const at::Tensor& logits, const OptTensor& targets) {
  const Target t = cpu_target("member_stats_fwd_cpu");
  check_member_stats(t, logits, targets);
  // bfloat16/float16 logits: computed in float32 (the outputs are float32 for every dtype)
  if (is_reduced(logits)) {
    return member_stats_fwd(logits.to(at::kFloat), targets);
  }
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor mean_probs = alloc({B, C}, f32);
  at::Tensor variance = alloc({B}, f32), eom = alloc({B}, f32);
  at::Tensor me = alloc({B}, f32), mi = alloc({B}, f32);
  at::Tensor pred = alloc({B}, logits.options().dtype(at::kLong));
  at::Tensor disagreement = alloc({B}, f32);
  const bool has_t = targets.has_value();
  at::Tensor correct = alloc({has_t ? B : 0}, f32);
  const int64_t rpb = rows_per_block(S, C);
  const int64_t nblocks = (B + rpb - 1) / rpb;
  at::Tensor hits = alloc({has_t ? nblocks : 0, S}, logits.options().dtype(at::kLong));

  Outs o{mean_probs.data_ptr<float>(), variance.data_ptr<float>(), eom.data_ptr<float>(),
         me.data_ptr<float>(), mi.data_ptr<float>(), pred.data_ptr<int64_t>(),
         disagreement.data_ptr<float>(), has_t ? correct.data_ptr<float>() : nullptr,
         has_t ? hits.data_ptr<int64_t>() : nullptr};
  const int64_t* tg = has_t ? targets->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "member_stats_fwd_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<float> P(S * rpb * C), X(rpb * C + 2 * rpb), H(rpb);
      std::vector<int64_t> member_pred(S * rpb);
      for (int64_t k = k0; k < k1; ++k) {
        stats_block<scalar_t>(lp, tg, o, k, rpb, S, B, C, P.data(), X.data(), H.data(),
                              member_pred.data());
      }
    });
  });
  at::Tensor member_correct = alloc({0}, f32);
  if (has_t) member_correct = hits.sum(0).to(at::kFloat).div_(static_cast<double>(B));
  return {mean_probs, variance, eom, me, mi, pred, disagreement, correct, member_correct};
}

}  // namespace cpu
}  // namespace faststeal
