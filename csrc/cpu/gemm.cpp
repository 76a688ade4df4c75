// The per-member GEMMs of the CPU ops, in one place (the shared-input backward of ensemble_linear
// and bayes_linear is one at::mm over all members and stays on MKL). float32 goes to oneDNN one
// member at a time, through ATen's own registered op `mkldnn::_linear_pointwise` (the oneDNN
// inner-product primitive with a fused bias; relu is torch's relu_ after it, which keeps NaN
// where the fused oneDNN post-op gives 0): on AVX-512 machines where MKL runs
// its AVX2 code (AMD Zen 4/5) that is ~2.2x the rate of at::bmm (measured in
// docs/benchmarks.md). Everything else — other dtypes, empty shapes, a torch built without
// oneDNN, FASTSTEAL_CPU_GEMM=bmm — uses at::bmm / baddbmm (MKL or OpenBLAS). Both are plain fp32
// GEMMs; they differ only in summation order.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../ops.h"

namespace faststeal {
namespace cpu {
namespace {

// A short reduction (the dW GEMM of a small batch: reduction over the batch rows) produces a
// large output per member that at::stack then copies; there at::bmm is faster (measured: S=16
// MLP step at batch 32).
constexpr int64_t kMinReduction = 64;

const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

// Set once a oneDNN call throws (e.g. a future torch changed the private op's schema): from then
// on every GEMM takes at::bmm, after one warning.
std::atomic<bool> g_onednn_failed{false};

// Why float32 GEMMs cannot take oneDNN in this process, or nullptr.
const char* onednn_unavailable() {
  const char* env = std::getenv("FASTSTEAL_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "bmm") == 0) return "FASTSTEAL_CPU_GEMM=bmm";
  if (onednn_linear() == nullptr) return "this torch has no mkldnn::_linear_pointwise";
  if (g_onednn_failed.load(std::memory_order_relaxed)) return "a oneDNN call failed earlier";
  return nullptr;
}

bool use_onednn(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kFloat || a.numel() == 0 || b.numel() == 0) return false;
  if (a.size(-1) < kMinReduction) return false;
  return onednn_unavailable() == nullptr;
}

at::Tensor onednn_member(const c10::OperatorHandle& op, const at::Tensor& a, const at::Tensor& b,
                         const OptTensor& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a);
  stack.emplace_back(b);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));  // no fused relu: oneDNN's maps NaN to 0
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());  // algorithm: None
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

namespace detail {

at::Tensor stacked_linear(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                          bool relu) {
  const int64_t S = b.size(0);
  const bool shared = a.dim() == 2;
  if (use_onednn(a, b)) {
    const c10::OperatorHandle& op = *onednn_linear();
    std::vector<at::Tensor> outs;
    outs.reserve(S);
    try {
      for (int64_t s = 0; s < S; ++s) {
        outs.push_back(onednn_member(op, shared ? a : a.select(0, s), b.select(0, s),
                                     bias.has_value() ? OptTensor(bias->select(0, s))
                                                      : OptTensor()));
        // oneDNN's fused relu post-op turns NaN into 0; torch's relu_ keeps it (the reference),
        // on the member's output while it is still in cache
        if (relu) outs.back().relu_();
      }
      return at::stack(outs);
    } catch (const c10::Error& e) {
      g_onednn_failed.store(true);
      TORCH_WARN_ONCE("faststeal: the oneDNN GEMM (mkldnn::_linear_pointwise) failed, the CPU ops ",
                      "use at::bmm from now on: ", e.what_without_backtrace());
    }
  }
  const at::Tensor a3 = shared ? a.unsqueeze(0).expand({S, a.size(0), a.size(1)}) : a;
  at::Tensor out = bias.has_value() ? at::baddbmm(bias->unsqueeze(1), a3, b.transpose(1, 2))
                                    : at::bmm(a3, b.transpose(1, 2));
  if (relu) out.relu_();
  return out;
}

std::string cpu_gemm_library() {
  const char* why = onednn_unavailable();
  if (why != nullptr) return std::string("torch.bmm (") + why + ")";
  return "oneDNN (mkldnn::_linear_pointwise) for float32 with a reduction >= " +
         std::to_string(kMinReduction) + ", else torch.bmm";
}

}  // namespace detail
}  // namespace cpu
}  // namespace faststeal
