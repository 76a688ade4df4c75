// member_stats on CUDA: one warp per batch row computes every across-member statistic.
//
// Pass 1 (over members, classes split across lanes): each member's max, log-sum-exp offset,
// entropy and argmax (first index) with warp reductions; the per-member (max, log sum) pairs and
// argmaxes stay in shared memory. Pass 2 (over classes, lanes split them): p_s(c) =
// exp((x - max_s) - logsum_s), which keeps full precision for mean-shifted logits (never
// exp(x - lse) with lse ~ 1e4), then the two-pass mean/variance across members, the entropy of
// the mean and its argmax. Logits are read in their dtype and computed in float32.
// Non-finite logits follow the reference (see csrc/cpu/member_stats.cpp): NaN / +inf rows give
// NaN statistics and argmax 0, -inf logits probability 0.
#include "cuda_common.cuh"
#include "ops_cuda.h"

namespace faststeal {
namespace gpu {
namespace {

template <typename T>
__global__ void member_stats_kernel(const T* __restrict__ logits,
                                    const int64_t* __restrict__ targets, float* __restrict__ mean_p,
                                    float* __restrict__ variance, float* __restrict__ eom_out,
                                    float* __restrict__ me_out, float* __restrict__ mi_out,
                                    int64_t* __restrict__ pred_out, float* __restrict__ disagree,
                                    float* __restrict__ correct, int* __restrict__ hits, int64_t S,
                                    int64_t B, int64_t C) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  // Per warp: S floats of max, S floats of log-sum, S ints of member argmax.
  float* smax = reinterpret_cast<float*>(smem_raw) + warp * 2 * S;
  float* slog = smax + S;
  int* sarg = reinterpret_cast<int*>(reinterpret_cast<float*>(smem_raw) + nwarps * 2 * S) +
              warp * S;
  const int64_t b = blockIdx.x * static_cast<int64_t>(nwarps) + warp;
  if (b >= B) return;  // whole warps exit together; no block-level sync below

  float ent_sum = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const T* row = logits + (s * B + b) * C;
    float m = -INFINITY;
    int64_t arg = C;
    for (int64_t c = lane; c < C; c += 32) {
      const float v = static_cast<float>(row[c]);
      if (v > m) {  // lane-local classes ascend, so strict > keeps the first index
        m = v;
        arg = c;
      }
    }
    warp_argmax(m, arg);
    float sum = 0.0f, ex = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float xm = static_cast<float>(row[c]) - m;
      const float e = __expf(xm);
      sum += e;
      ex += e == 0.0f ? 0.0f : e * xm;  // 0 log 0 = 0 for xm = -inf; a NaN e is kept
    }
    sum = warp_sum(sum);
    ex = warp_sum(ex);
    const float ls = __logf(sum);
    // H[p_s] = -sum p log p = log(sum) - sum p (x - m)
    ent_sum += ls - ex / sum;
    if (lane == 0) {
      smax[s] = m;
      slog[s] = ls;
      // A NaN or +inf logit makes sum NaN and every p_s(c) NaN: the reference's argmax of a NaN
      // row is class 0 (the first NaN), whatever the finite logits' argmax was.
      sarg[s] = isnan(ls) ? 0 : static_cast<int>(arg);
    }
  }
  __syncwarp();

  const float inv_s = 1.0f / static_cast<float>(S);
  float var_acc = 0.0f, eom = 0.0f, best = -1.0f;
  int64_t pred = C;
  for (int64_t c = lane; c < C; c += 32) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      acc += __expf((static_cast<float>(logits[(s * B + b) * C + c]) - smax[s]) - slog[s]);
    }
    const float mean = acc * inv_s;
    float sq = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float p = __expf((static_cast<float>(logits[(s * B + b) * C + c]) - smax[s]) - slog[s]);
      const float dlt = p - mean;
      sq += dlt * dlt;
    }
    var_acc += sq * inv_s;
    if (mean != 0.0f) eom -= mean * __logf(mean);  // xlogy: 0 log 0 = 0; NaN kept
    if (mean > best) {
      best = mean;
      pred = c;
    }
    mean_p[b * C + c] = mean;
  }
  var_acc = warp_sum(var_acc);
  eom = warp_sum(eom);
  warp_argmax(best, pred);
  // The mean row is all NaN exactly when some member's sum was NaN, i.e. when ent_sum is NaN
  // (identical in every lane: xor-butterfly sums); its argmax is class 0 like torch.argmax's.
  if (isnan(ent_sum)) pred = 0;
  int dis = 0;
  const int64_t tb = targets ? targets[b] : -1;
  for (int64_t s = lane; s < S; s += 32) {
    dis += sarg[s] != pred;
    if (targets && sarg[s] == tb) atomicAdd(hits + s, 1);  // integer: order-independent
  }
  dis = warp_sum(dis);
  if (lane == 0) {
    const float me = ent_sum * inv_s;
    variance[b] = var_acc / static_cast<float>(C);
    eom_out[b] = eom;
    me_out[b] = me;
    const float mi = eom - me;
    mi_out[b] = mi < 0.0f ? 0.0f : mi;  // >= 0 (the entropies round differently); NaN kept
    pred_out[b] = pred;
    disagree[b] = static_cast<float>(dis) * inv_s;
    if (targets) correct[b] = pred == tb ? 1.0f : 0.0f;
  }
}

}  // namespace

std::vector<at::Tensor> member_stats_fwd(const at::Tensor& logits, const OptTensor& targets) {
  const Target t = cuda_target("member_stats_fwd_cuda");
  check_member_stats(t, logits, targets);
  if (targets.has_value()) {
    TORCH_CHECK(targets->device() == logits.device(), t.fn, ": targets is on ",
                targets->device(), " but logits is on ", logits.device());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t S = logits.size(0), B = logits.size(1), C = logits.size(2);
  // Shared memory is 12 bytes per member per warp.
  const int64_t per_warp = 12 * S;
  TORCH_CHECK(per_warp <= 48 * 1024, t.fn, ": at most 4096 members are supported, got S = ", S);
  const int64_t nwarps = std::max<int64_t>(1, std::min<int64_t>(8, (48 * 1024) / per_warp));
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor mean_probs = alloc({B, C}, f32);
  at::Tensor variance = alloc({B}, f32), eom = alloc({B}, f32);
  at::Tensor me = alloc({B}, f32), mi = alloc({B}, f32);
  at::Tensor pred = alloc({B}, logits.options().dtype(at::kLong));
  at::Tensor disagreement = alloc({B}, f32);
  const bool has_t = targets.has_value();
  at::Tensor correct = alloc({has_t ? B : 0}, f32);
  at::Tensor hits = at::zeros({has_t ? S : 0}, logits.options().dtype(at::kInt));
  FS_DISPATCH_CUDA(logits.scalar_type(), "member_stats_fwd_cuda", [&] {
    const dim3 grid((B + nwarps - 1) / nwarps);
    member_stats_kernel<scalar_t><<<grid, nwarps * 32, nwarps * per_warp, stream()>>>(
        logits.data_ptr<scalar_t>(), has_t ? targets->data_ptr<int64_t>() : nullptr,
        mean_probs.data_ptr<float>(), variance.data_ptr<float>(), eom.data_ptr<float>(),
        me.data_ptr<float>(), mi.data_ptr<float>(), pred.data_ptr<int64_t>(),
        disagreement.data_ptr<float>(), has_t ? correct.data_ptr<float>() : nullptr,
        has_t ? hits.data_ptr<int>() : nullptr, S, B, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor member_correct = alloc({0}, f32);
  if (has_t) member_correct = hits.to(at::kFloat).div_(static_cast<double>(B));
  return {mean_probs, variance, eom, me, mi, pred, disagreement, correct, member_correct};
}

}  // namespace gpu
}  // namespace faststeal
