// Input validation shared by the CPU and CUDA entry points of faststeal._C. Every message starts
// with the entry point's name and names the offending argument with its sizes, dtype or device.
#include <algorithm>
#include <cmath>
#include <atomic>
#include <limits>
#include <sstream>

#include "common.h"

namespace faststeal {

namespace {

std::atomic<bool> g_poison{false};

std::string dtype_list(const std::vector<at::ScalarType>& dtypes) {
  std::ostringstream os;
  for (size_t i = 0; i < dtypes.size(); ++i) os << (i ? ", " : "") << dtypes[i];
  return os.str();
}

}  // namespace

void set_poison_outputs(bool on) { g_poison.store(on); }

at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (g_poison.load(std::memory_order_relaxed) && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-777);
  }
  return t;
}

at::Tensor alloc_like(const at::Tensor& t) { return alloc(t.sizes(), t.options()); }

Target cpu_target(const char* fn) {
  return {fn, c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}};
}

Target cuda_target(const char* fn) {
  return {fn, c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}};
}

void check_device(const Target& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().type() == t.device, t.fn, ": ", name, " must be a ",
              c10::DeviceTypeName(t.device), " tensor, got device ", x.device());
}

void check_contiguous(const Target& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_contiguous(), t.fn, ": ", name, " must be contiguous, got sizes ", x.sizes(),
              " with strides ", x.strides(), " (call .contiguous())");
}

void check_float(const Target& t, const at::Tensor& x, const char* name,
                 std::initializer_list<int64_t> ranks) {
  TORCH_CHECK(x.defined(), t.fn, ": ", name, " is an undefined tensor");
  const bool rank_ok = std::find(ranks.begin(), ranks.end(), x.dim()) != ranks.end();
  if (!rank_ok) {
    std::ostringstream want;
    size_t i = 0;
    for (int64_t r : ranks) want << (i++ ? " or " : "") << r << "-D";
    TORCH_CHECK(false, t.fn, ": ", name, " must be ", want.str(), ", got ", x.dim(),
                "-D with sizes ", x.sizes());
  }
  check_device(t, x, name);
  TORCH_CHECK(std::find(t.dtypes.begin(), t.dtypes.end(), x.scalar_type()) != t.dtypes.end(),
              t.fn, ": ", name, " has dtype ", x.scalar_type(), ", expected one of ",
              dtype_list(t.dtypes));
  check_contiguous(t, x, name);
}

void check_like(const Target& t, const at::Tensor& x, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(x.device() == ref.device(), t.fn, ": ", name, " is on ", x.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), t.fn, ": ", name, " has dtype ",
              x.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

void check_size(const Target& t, const at::Tensor& x, const char* name, int64_t dim,
                int64_t expected, const char* what) {
  TORCH_CHECK(x.size(dim) == expected, t.fn, ": ", name, " has ", x.size(dim), " ", what,
              " (dim ", dim, " of sizes ", x.sizes(), "), expected ", expected);
}

Act parse_activation(const Target& t, const std::string& activation) {
  if (activation == "none") return Act::kNone;
  if (activation == "relu") return Act::kRelu;
  if (activation == "gelu") return Act::kGelu;
  TORCH_CHECK(false, t.fn, ": activation must be 'none', 'relu' or 'gelu', got '", activation,
              "'");
}

uint32_t check_key(const Target& t, int64_t key, const char* name) {
  TORCH_CHECK(key >= 0 && key <= static_cast<int64_t>(0xFFFFFFFFu), t.fn, ": ", name,
              " must be a 32-bit key in [0, 2**32) from faststeal.ops.rng.rng_key, got ", key);
  return static_cast<uint32_t>(key);
}

uint32_t dropout_threshold(const Target& t, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, t.fn, ": dropout_p must be in [0, 1], got ", p);
  // rng.dropout_threshold: min(int(p * 2**24), 2**24)
  const double v = p * 16777216.0;
  return v >= 16777216.0 ? 16777216u : static_cast<uint32_t>(v);
}

double dropout_scale(double p) {
  if (p <= 0.0) return 1.0;
  if (p >= 1.0) return 0.0;
  // The reference builds the scaled mask in float32, so the scale is the float32 rounding of
  // 1 / (1 - p) in every dtype.
  return static_cast<double>(static_cast<float>(1.0 / (1.0 - p)));
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

LinearDims check_ensemble_linear(const Target& t, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  check_float(t, x, "x", {2, 3});
  check_float(t, weight, "weight", {3});
  check_like(t, weight, "weight", x, "x");
  LinearDims d;
  d.S = weight.size(0);
  d.N = weight.size(1);
  d.K = weight.size(2);
  d.shared = x.dim() == 2;
  d.B = x.size(-2);
  TORCH_CHECK(x.size(-1) == d.K, t.fn, ": x has ", x.size(-1),
              " input features (last dim of sizes ", x.sizes(), ") but weight (S, N, K) has ", d.K,
              " (sizes ", weight.sizes(), ")");
  if (!d.shared) {
    TORCH_CHECK(x.size(0) == d.S, t.fn, ": x has ", x.size(0), " members (dim 0 of sizes ",
                x.sizes(), ") but weight (S, N, K) has ", d.S, " (sizes ", weight.sizes(), ")");
  }
  if (bias.has_value()) {
    check_float(t, *bias, "bias", {2});
    check_like(t, *bias, "bias", x, "x");
    TORCH_CHECK(bias->size(0) == d.S && bias->size(1) == d.N, t.fn,
                ": bias must be (members, out_features) = (", d.S, ", ", d.N, "), got sizes ",
                bias->sizes());
  }
  return d;
}

void check_ensemble_linear_bwd(const Target& t, const LinearDims& d, const at::Tensor& grad_y,
                               const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                               Act act) {
  for (auto [name, ten] : {std::pair<const char*, const at::Tensor*>{"grad_y", &grad_y},
                           {"y", &y}}) {
    check_float(t, *ten, name, {3});
    check_like(t, *ten, name, x, "x");
    TORCH_CHECK(ten->size(0) == d.S && ten->size(1) == d.B && ten->size(2) == d.N, t.fn, ": ",
                name, " must be (members, batch, out_features) = (", d.S, ", ", d.B, ", ", d.N,
                "), got sizes ", ten->sizes());
  }
  if (act == Act::kGelu) {
    check_float(t, z, "z", {3});
    check_like(t, z, "z", x, "x");
    TORCH_CHECK(z.size(0) == d.S && z.size(1) == d.B && z.size(2) == d.N, t.fn,
                ": z (the gelu pre-activation) must be (members, batch, out_features) = (", d.S,
                ", ", d.B, ", ", d.N, "), got sizes ", z.sizes());
  }
}

LinearDims check_bayes_linear(const Target& t, const at::Tensor& x, const at::Tensor& w_mu,
                              const at::Tensor& w_rho, const std::optional<at::Tensor>& b_mu,
                              const std::optional<at::Tensor>& b_rho, int64_t samples) {
  check_float(t, x, "x", {2, 3});
  check_float(t, w_mu, "w_mu", {2});
  check_float(t, w_rho, "w_rho", {2});
  check_like(t, w_mu, "w_mu", x, "x");
  check_like(t, w_rho, "w_rho", x, "x");
  TORCH_CHECK(samples >= 1, t.fn, ": samples must be >= 1, got ", samples);
  TORCH_CHECK(w_rho.sizes() == w_mu.sizes(), t.fn, ": w_rho must have w_mu's sizes ",
              w_mu.sizes(), ", got ", w_rho.sizes());
  LinearDims d;
  d.S = samples;
  d.N = w_mu.size(0);
  d.K = w_mu.size(1);
  d.shared = x.dim() == 2;
  d.B = x.size(-2);
  TORCH_CHECK(x.size(-1) == d.K, t.fn, ": x has ", x.size(-1),
              " input features (last dim of sizes ", x.sizes(), ") but w_mu (N, K) has ", d.K,
              " (sizes ", w_mu.sizes(), ")");
  if (!d.shared) {
    TORCH_CHECK(x.size(0) == samples, t.fn, ": x has ", x.size(0), " members (dim 0 of sizes ",
                x.sizes(), ") but samples is ", samples);
  }
  TORCH_CHECK(b_mu.has_value() == b_rho.has_value(), t.fn,
              ": b_mu and b_rho must both be given or both be None");
  if (b_mu.has_value()) {
    for (auto [name, ten] : {std::pair<const char*, const at::Tensor*>{"b_mu", &*b_mu},
                             {"b_rho", &*b_rho}}) {
      check_float(t, *ten, name, {1});
      check_like(t, *ten, name, x, "x");
      TORCH_CHECK(ten->size(0) == d.N, t.fn, ": ", name, " has ", ten->size(0),
                  " out features (sizes ", ten->sizes(), ") but w_mu (N, K) has ", d.N);
    }
  }
  return d;
}

void check_gaussian_kl(const Target& t, const at::Tensor& mu, const at::Tensor& rho,
                       double prior_sigma) {
  check_float(t, mu, "mu", {0, 1, 2, 3, 4, 5, 6, 7, 8});
  check_float(t, rho, "rho", {0, 1, 2, 3, 4, 5, 6, 7, 8});
  check_like(t, rho, "rho", mu, "mu");
  TORCH_CHECK(rho.sizes() == mu.sizes(), t.fn, ": rho must have mu's sizes ", mu.sizes(),
              ", got ", rho.sizes());
  TORCH_CHECK(prior_sigma > 0.0 && std::isfinite(prior_sigma), t.fn,
              ": prior_sigma must be a positive finite number, got ", prior_sigma);
}

void check_member_stats(const Target& t, const at::Tensor& logits,
                        const std::optional<at::Tensor>& targets) {
  check_float(t, logits, "logits", {3});
  TORCH_CHECK(logits.numel() > 0, t.fn, ": logits (members, batch, classes) must be non-empty, ",
              "got sizes ", logits.sizes());
  if (targets.has_value()) {
    const at::Tensor& tg = *targets;
    TORCH_CHECK(tg.dim() == 1, t.fn, ": targets must be 1-D (batch,), got sizes ", tg.sizes());
    check_device(t, tg, "targets");
    TORCH_CHECK(tg.scalar_type() == at::kLong, t.fn, ": targets must be int64 class labels, got ",
                tg.scalar_type());
    check_contiguous(t, tg, "targets");
    TORCH_CHECK(tg.size(0) == logits.size(1), t.fn, ": targets has ", tg.size(0),
                " rows but logits (S, B, C) has ", logits.size(1), " (sizes ", logits.sizes(), ")");
    // Labels outside [0, C) would silently count as wrong predictions (ensemble_cross_entropy
    // rejects them too). On CUDA this reads the labels back: member_stats is a metric.
    const int64_t C = logits.size(2);
    if (tg.device().is_cpu()) {
      const int64_t* lab = tg.data_ptr<int64_t>();
      for (int64_t b = 0; b < tg.size(0); ++b) {
        TORCH_CHECK(lab[b] >= 0 && lab[b] < C, t.fn, ": targets[", b, "] = ", lab[b],
                    " is not a class index in [0, ", C, ")");
      }
    } else {
      const at::Tensor bad = ((tg < 0) | (tg >= C)).nonzero();
      if (bad.size(0) > 0) {
        const int64_t b = bad[0][0].item<int64_t>();
        TORCH_CHECK(false, t.fn, ": targets[", b, "] = ", tg[b].item<int64_t>(),
                    " is not a class index in [0, ", C, ")");
      }
    }
  }
}

bool check_ensemble_xent(const Target& t, const at::Tensor& logits, const at::Tensor& target) {
  check_float(t, logits, "logits", {3});
  check_device(t, target, "target");
  check_contiguous(t, target, "target");
  const int64_t B = logits.size(1), C = logits.size(2);
  TORCH_CHECK(C > 0, t.fn, ": logits must have at least one class, got sizes ", logits.sizes());
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), t.fn, ": soft target has dtype ",
                target.scalar_type(), " but logits has dtype ", logits.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == C, t.fn,
                ": soft target must be (batch, classes) = (", B, ", ", C, "), got sizes ",
                target.sizes());
    return true;
  }
  TORCH_CHECK(target.scalar_type() == at::kLong, t.fn,
              ": target must be int64 labels or float probabilities, got dtype ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == B, t.fn,
              ": hard target must be (batch,) = (", B, ",), got sizes ", target.sizes());
  return false;
}

void check_grad_scalar_per_member(const Target& t, const at::Tensor& grad, int64_t S) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == S, t.fn, ": grad must be (members,) = (", S,
              ",), got sizes ", grad.sizes());
  check_device(t, grad, "grad");
  check_contiguous(t, grad, "grad");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), t.fn,
              ": grad must be floating point, got dtype ", grad.scalar_type());
}

}  // namespace faststeal
