// The per-member GEMMs of the CPU ops, in one place, with every candidate library exposed so
// that Python measures them on the host and picks (faststeal/ops/tuning.py; the choice is made
// per op and shape class and handed down through a thread-local path, set_cpu_gemm_path):
//
//   onednn  one oneDNN inner product per member through ATen's registered op
//           `mkldnn::_linear_pointwise` (bias fused; the results are then stacked). On AMD Zen 4/5,
//           where MKL runs its AVX2 code, ~2x the rate of at::bmm; on Intel AVX-512/AMX hosts
//           often slower than one at::bmm (docs/benchmarks.md). bfloat16/float16 only where
//           ATen says this CPU's oneDNN has them (else the call runs at::bmm).
//   bmm     one at::bmm / at::baddbmm over all members (MKL, or oneDNN/AMX for bfloat16).
//   mm      a shared input (every member sees the same rows): ONE at::mm / addmm against the
//           (S*N, K) stack of all members' weights, then one transposing copy; a stacked input:
//           one at::mm per member written into its slice of the output (no stack copy).
//   packed  at::bmm as bmm, after copying a transposed (strided) operand into row-major order:
//           the backward's dW GEMM multiplies dz^T, a transposed view; with a dense copy of it
//           (S*B*N elements, small beside the GEMM) oneDNN's bfloat16 batched matmul ran the
//           S=16, 784->512 dW 1.36x (batch 128) and 1.69x (batch 32) faster on an AMX host
//           (Intel Xeon, family 6 model 207, 2 threads; docs/benchmarks.md), while the
//           forward's W^T copy made it slower there: measured per op and shape class like the
//           others.
//   upcast  bfloat16/float16 operands cast to float32, one float32 at::bmm, the product cast
//           back (float32/float64 inputs: bmm). Where the CPU has no bfloat16 arithmetic (AVX2
//           only: no AVX512-BF16, no AMX) ATen's bfloat16 GEMMs are slow fallbacks and oneDNN
//           refuses them: on an AMD EPYC Zen 3 (2 threads) the S=16, 784->512 forward at batch
//           128 took 118 ms in bfloat16 through at::bmm, 16 ms this way and 12.5 ms in float32
//           (docs/benchmarks.md). The product is rounded once, to the input dtype, as the
//           other paths round their float32 accumulator.
//   default (tuning off, FASTSTEAL_TUNE=0): oneDNN for float32 with a reduction >= 64, upcast
//           for bfloat16/float16 where oneDNN cannot multiply them (no bf16 arithmetic), else
//           at::bmm — documented in docs/benchmarks.md.
//
// detail::mm, the 2-D product of the shared-input backward, follows the path's dtype rule
// (upcast or not); its GEMM is at::mm on every other path.
//
// All paths are plain GEMMs with float32 accumulation (bfloat16/float16 inputs are multiplied
// with float32 accumulation by every library); they differ only in summation order. relu is
// applied after the GEMM with at::relu_, which keeps NaN (oneDNN's fused relu post-op maps NaN to
// 0), so a diverged network stays visibly NaN on every path.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <string>

#include "../common.h"
#include "../ops.h"

namespace faststeal {
namespace cpu {
namespace {

// The default rule's threshold: a short reduction (the dW GEMM of a small batch) produces a
// large output per member that at::stack then copies; there at::bmm was faster (AMD host, S=16
// MLP step at batch 32).
constexpr int64_t kMinReduction = 64;

thread_local GemmPath g_path = GemmPath::kDefault;

const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

// Set once a oneDNN call throws (e.g. a future torch changed the private op's schema): from then
// on the onednn path runs at::bmm, after one warning.
std::atomic<bool> g_onednn_failed{false};

// Whether this CPU's oneDNN multiplies bfloat16 / float16 (asked of ATen's own checks, the ops
// mkldnn::_is_mkldnn_{bf16,fp16}_supported): without AVX512-BF16/AMX it cannot create the
// primitive and throws.
bool onednn_supports(const char* op_name) {
  const auto op = c10::Dispatcher::singleton().findOp({op_name, ""});
  if (!op.has_value()) return false;
  try {
    torch::jit::Stack stack;
    op->callBoxed(&stack);
    return !stack.empty() && stack.back().toBool();
  } catch (const std::exception&) {  // a torch whose op changed: do not use oneDNN for it
    return false;
  }
}

bool onednn_dtype(at::ScalarType t) {
  static const bool bf16 = onednn_supports("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = onednn_supports("mkldnn::_is_mkldnn_fp16_supported");
  return t == at::kFloat || (t == at::kBFloat16 && bf16) || (t == at::kHalf && fp16);
}

at::Tensor onednn_member(const c10::OperatorHandle& op, const at::Tensor& a, const at::Tensor& b,
                         const OptTensor& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a);
  stack.emplace_back(b);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());  // algorithm: None
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

// std::nullopt when the oneDNN call failed (then the caller falls back to at::bmm).
std::optional<at::Tensor> onednn_linear_all(const at::Tensor& a, const at::Tensor& b,
                                            const OptTensor& bias, bool shared) {
  const int64_t S = b.size(0);
  std::vector<at::Tensor> outs;
  outs.reserve(S);
  try {
    for (int64_t s = 0; s < S; ++s) {
      outs.push_back(onednn_member(*onednn_linear(), shared ? a : a.select(0, s), b.select(0, s),
                                   bias.has_value() ? OptTensor(bias->select(0, s))
                                                    : OptTensor()));
    }
    return at::stack(outs);
  } catch (const std::exception& e) {  // c10::Error, or oneDNN's own dnnl::error
    g_onednn_failed.store(true);
    TORCH_WARN_ONCE("faststeal: the oneDNN GEMM (mkldnn::_linear_pointwise) failed, the CPU ops ",
                    "use at::bmm instead from now on: ",
                    dynamic_cast<const c10::Error*>(&e) != nullptr
                        ? static_cast<const c10::Error&>(e).what_without_backtrace()
                        : e.what());
  }
  return std::nullopt;
}

at::Tensor bmm_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                      bool shared, bool packed) {
  const int64_t S = b.size(0);
  // packed: row-major copies of strided operands (a shared input before its stride-0 expand)
  const at::Tensor a2 = packed ? a.contiguous() : a;
  const at::Tensor a3 = shared ? a2.unsqueeze(0).expand({S, a.size(0), a.size(1)}) : a2;
  const at::Tensor bt = packed ? b.transpose(1, 2).contiguous() : b.transpose(1, 2);
  return bias.has_value() ? at::baddbmm(bias->unsqueeze(1), a3, bt) : at::bmm(a3, bt);
}

at::Tensor mm_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                     bool shared) {
  const int64_t S = b.size(0), M = a.size(-2), N = b.size(1), K = b.size(2);
  if (shared) {
    // (M, K) @ (K, S*N) in one GEMM; b's (S, N, K) is (S*N, K) when its last two dims are dense.
    const at::Tensor b2 = b.reshape({S * N, K});
    const at::Tensor o = bias.has_value() ? at::addmm(bias->reshape({S * N}), a, b2.t())
                                          : at::mm(a, b2.t());
    return o.view({M, S, N}).transpose(0, 1).contiguous();
  }
  at::Tensor out = at::empty({S, M, N}, a.options());
  for (int64_t s = 0; s < S; ++s) {
    at::Tensor o = out.select(0, s);
    if (bias.has_value()) {
      at::addmm_out(o, bias->select(0, s), a.select(0, s), b.select(0, s).t());
    } else {
      at::mm_out(o, a.select(0, s), b.select(0, s).t());
    }
  }
  return out;
}

// The thread's path, or without one (no tuning) the default rule: oneDNN for float32 with a
// reduction of at least kMinReduction; upcast for a bfloat16/float16 GEMM that this CPU's
// oneDNN cannot multiply (no bfloat16 arithmetic under it: ATen's fallback); else at::bmm.
GemmPath resolved_path(at::ScalarType t, int64_t reduction) {
  if (g_path != GemmPath::kDefault) return g_path;
  if (t == at::kFloat && reduction >= kMinReduction) return GemmPath::kOneDNN;
  if (is_reduced(t) && !onednn_dtype(t)) return GemmPath::kUpcast;
  return GemmPath::kBmm;
}

}  // namespace

GemmPath set_cpu_gemm_path(GemmPath path) {
  const GemmPath prev = g_path;
  g_path = path;
  return prev;
}

namespace detail {

at::Tensor stacked_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                          bool relu) {
  // The GEMM runs in the dtype it is given: under CPU autocast (bf16 training calls these ops
  // from inside torch.autocast) at::bmm / at::mm would cast upcast's float32 operands back to
  // bfloat16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool shared = a.dim() == 2;
  const bool empty = a.numel() == 0 || b.numel() == 0;
  GemmPath path = resolved_path(a.scalar_type(), a.size(-1));
  if (path == GemmPath::kOneDNN &&
      (empty || !onednn_dtype(a.scalar_type()) || onednn_linear() == nullptr ||
       g_onednn_failed.load(std::memory_order_relaxed))) {
    path = GemmPath::kBmm;  // oneDNN cannot run this call: the documented fallback
  }
  if (path == GemmPath::kUpcast && !is_reduced(a.scalar_type())) path = GemmPath::kBmm;
  std::optional<at::Tensor> out;
  if (path == GemmPath::kOneDNN) out = onednn_linear_all(a, b, bias, shared);
  if (path == GemmPath::kUpcast) {
    out = bmm_linear(a.to(at::kFloat), b.to(at::kFloat),
                     bias.has_value() ? OptTensor(bias->to(at::kFloat)) : OptTensor(), shared,
                     /*packed=*/false)
              .to(a.scalar_type());
  }
  if (!out.has_value()) {
    out = (path == GemmPath::kMm && !empty)
              ? mm_linear(a, b, bias, shared)
              : bmm_linear(a, b, bias, shared, path == GemmPath::kPacked);
  }
  if (relu) out->relu_();  // NaN-preserving, unlike oneDNN's fused relu
  return *out;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (resolved_path(a.scalar_type(), a.size(-1)) == GemmPath::kUpcast &&
      is_reduced(a.scalar_type())) {
    return at::mm(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
  }
  return at::mm(a, b);
}

std::string cpu_gemm_library() {
  std::string s = "paths onednn (mkldnn::_linear_pointwise per member";
  if (onednn_linear() == nullptr) s += ": unavailable, this torch has no such op";
  if (g_onednn_failed.load()) s += ": unavailable, a oneDNN call failed earlier";
  s += "), bmm (torch.bmm), mm (torch.mm), packed (torch.bmm on row-major copies of "
       "transposed operands), upcast (bfloat16/float16 multiplied as float32 by torch.bmm); "
       "default without tuning: onednn for float32 with a "
       "reduction >= " + std::to_string(kMinReduction) + ", upcast for bfloat16/float16 where "
       "oneDNN cannot multiply them (oneDNN bfloat16 on this CPU: " +
       (onednn_dtype(at::kBFloat16) ? "yes" : "no") + "), else bmm";
  return s;
}

}  // namespace detail
}  // namespace cpu
}  // namespace faststeal
