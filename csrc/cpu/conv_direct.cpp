// conv2d_direct: S stacked stride-1 2-D convolutions (dilation 1, groups 1, zero padding smaller
// than the kernel) of float32 images on the CPU, computed directly - vector FMAs along each
// output row, no im2col - for the narrow layers of small CNNs, the first above all (1 or 3 input
// channels), where oneDNN's convolution runs far below the FMA rate: on the 2-vCPU Intel Xeon
// of docs/benchmarks.md (family 6 model 207, AVX-512), lenet's first conv (1 -> 6 channels, 5x5,
// 28x28, batch 128) took ATen 0.7-0.9 ms per member forward and as much again for its weight
// gradient. Whether it runs is measured per host and shape class like every conv strategy
// (faststeal/nn/layers.py, strategy "direct"); it is never faster for wide layers, which the
// tuner then leaves to oneDNN.
//
//   x (S, B, C, H, W), weight (S, O, C, KH, KW), bias (S, O) or none -> y (S, B, O, Ho, Wo),
//   Ho = H + 2*ph - KH + 1, Wo = W + 2*pw - KW + 1.
//
// The backward's input gradient is this same forward over grad_y with the kernels flipped and
// transposed (O <-> C) and padding KH-1-ph, KW-1-pw (faststeal/ops/conv_direct.py); the weight
// and bias gradients are conv2d_direct_dw below. Sums run in a different order than oneDNN's,
// so results match ATen to float32 rounding, not bit for bit (tests/test_conv_direct.py).
//
// The kernels (conv_direct_kernel.h) exist for AVX-512 and for AVX2+FMA on x86-64 with GCC; the
// best the CPU has is picked at run time (isa argument: 2 = AVX-512, 1 = AVX2, 0 = the best;
// tests force each). Elsewhere conv2d_direct_isa() is 0 and the strategy is not offered.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

#ifdef FS_X86_GCC
#define FS_CONV_DIRECT 1
#include <immintrin.h>
#endif

namespace faststeal {
namespace cpu {

#ifdef FS_CONV_DIRECT
namespace {

constexpr int kMaxKW = 7;  // kernel widths the weight-gradient kernel is instantiated for

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct V {
  using R = __m512;
  static constexpr int L = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float a) { return _mm512_set1_ps(a); }
  static R loadu(const float* p) { return _mm512_loadu_ps(p); }
  static __mmask16 mask(int n) { return n >= L ? 0xFFFF : (n <= 0 ? 0 : (1u << n) - 1); }
  // n valid lanes from p (the rest zero; masked lanes are not read)
  static R load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(float* p, R v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  // c + a * (the n valid lanes of p); the other lanes of c unchanged (p's lanes past n may be
  // read but never used: 0 * inf there is not NaN)
  using Lanes = __mmask16;
  static Lanes lanes(int n) { return mask(n); }
  static R fmadd_lanes(R a, const float* p, R c, Lanes m) {
    return _mm512_mask3_fmadd_ps(a, loadu(p), c, m);
  }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static float sum(R v) {  // (not _mm512_reduce_add_ps: GCC 12 warns inside it)
    alignas(64) float t[L];
    _mm512_store_ps(t, v);
    float s = 0.0f;
    for (int i = 0; i < L; ++i) s += t[i];
    return s;
  }
};
constexpr int kAcc = 32;   // zmm0-31
constexpr int kMaxNV = 2;  // vectors per output row tile (32 columns)
#include "conv_direct_kernel.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using R = __m256;
  static constexpr int L = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float a) { return _mm256_set1_ps(a); }
  static R loadu(const float* p) { return _mm256_loadu_ps(p); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R load_n(const float* p, int n) {
    return n >= L ? loadu(p) : _mm256_maskload_ps(p, mask(n));
  }
  static void store_n(float* p, R v, int n) {
    if (n >= L) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask(n), v);
  }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  using Lanes = __m256;  // all-ones lanes
  static Lanes lanes(int n) { return _mm256_castsi256_ps(mask(n)); }
  static R fmadd_lanes(R a, const float* p, R c, Lanes m) {
    return _mm256_fmadd_ps(a, _mm256_and_ps(loadu(p), m), c);
  }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
constexpr int kAcc = 16;   // ymm0-15
constexpr int kMaxNV = 4;  // vectors per output row tile (32 columns)
#include "conv_direct_kernel.h"
}  // namespace avx2
#pragma GCC pop_options

// Floats per padded row beyond Wo - 1 that a kernel may read: a weight-gradient tile of 4 vectors
// of the widest ISA (AVX-512, 16 lanes) starting at a column < Wo.
constexpr int kRowTile = 4 * 16;

int resolve_isa(const Target& t, int64_t isa) {
  const int64_t best = conv2d_direct_isa();
  TORCH_CHECK(isa >= 0 && isa <= 2, t.fn, ": isa must be 0 (the best available), 1 (AVX2) or ",
              "2 (AVX-512), got ", isa);
  TORCH_CHECK(best > 0, t.fn, ": this CPU has neither AVX2+FMA nor AVX-512");
  TORCH_CHECK(isa <= best, t.fn, ": isa ", isa, " is not available on this CPU (best: ", best,
              ")");
  return static_cast<int>(isa == 0 ? best : isa);
}

// Copies nb images (nb, C, H, W) into zero-padded (nb, C, Hp, Wp) planes at row ph, column pw.
void pad_images(const float* x, int64_t nb, int64_t C, int64_t H, int64_t W, int ph, int pw,
                int Hp, int Wp, float* xp) {
  std::fill(xp, xp + nb * C * Hp * Wp, 0.0f);
  for (int64_t p = 0; p < nb * C; ++p)
    for (int64_t r = 0; r < H; ++r)
      std::memcpy(xp + (p * Hp + r + ph) * Wp + pw, x + (p * H + r) * W, W * sizeof(float));
}

struct ConvDims {
  int64_t S, B, C, H, W, O, KH, KW, Ho, Wo;
  int ph, pw, Hp, Wp;
};

ConvDims conv_dims(const at::Tensor& x, int64_t O, int64_t KH, int64_t KW, int64_t ph,
                   int64_t pw) {
  ConvDims d{};
  d.S = x.size(0), d.B = x.size(1), d.C = x.size(2), d.H = x.size(3), d.W = x.size(4);
  d.O = O, d.KH = KH, d.KW = KW;
  d.ph = static_cast<int>(ph), d.pw = static_cast<int>(pw);
  d.Ho = d.H + 2 * ph - KH + 1, d.Wo = d.W + 2 * pw - KW + 1;
  d.Hp = static_cast<int>(d.H + 2 * ph);
  d.Wp = static_cast<int>((d.Wo + kRowTile - 1) / kRowTile * kRowTile + KW - 1);
  return d;
}

void check_geometry(const Target& t, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                    int64_t ph, int64_t pw) {
  TORCH_CHECK(C >= 1 && H >= 1 && W >= 1, t.fn, ": x must have at least one channel, row and ",
              "column, got C = ", C, ", H = ", H, ", W = ", W);
  TORCH_CHECK(KH >= 1 && KW >= 1 && KW <= kMaxKW, t.fn, ": the kernel must be KH x KW with ",
              "KH >= 1 and 1 <= KW <= ", kMaxKW, ", got ", KH, " x ", KW);
  TORCH_CHECK(ph >= 0 && ph < KH && pw >= 0 && pw < KW, t.fn, ": padding (", ph, ", ", pw,
              ") must be >= 0 and smaller than the kernel (", KH, ", ", KW, ")");
  TORCH_CHECK(H + 2 * ph >= KH && W + 2 * pw >= KW, t.fn, ": the padded image (", H + 2 * ph,
              " x ", W + 2 * pw, ") is smaller than the kernel (", KH, " x ", KW, ")");
  // the vector offsets into a padded image are int: C * Hp * Wp (Wp < W + 2*pw + kRowTile + KW)
  TORCH_CHECK(C * (H + 2 * ph) * (W + 2 * pw + kRowTile + KW) < (int64_t{1} << 31), t.fn,
              ": the image is too large for this kernel (C = ", C, ", ", H, " x ", W, ")");
}

}  // namespace

int64_t conv2d_direct_isa() {
  static const int64_t best = [] {  // asked once per process (every op call checks its isa)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return int64_t{2};
    if (cpu_has_avx2_fma()) return int64_t{1};
    return int64_t{0};
  }();
  return best;
}

at::Tensor conv2d_direct_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                             int64_t ph, int64_t pw, int64_t isa_arg) {
  const Target t{"conv2d_direct_fwd_cpu", c10::DeviceType::CPU, {at::kFloat}};
  const int isa = resolve_isa(t, isa_arg);
  check_float(t, x, "x", {5});
  check_float(t, weight, "weight", {5});
  TORCH_CHECK(weight.size(0) == x.size(0) && weight.size(2) == x.size(2), t.fn,
              ": weight must be (S, O, C, KH, KW) with S = ", x.size(0), " and C = ", x.size(2),
              " of x (S, B, C, H, W), got sizes ", weight.sizes(), " for x of sizes ", x.sizes());
  const int64_t O = weight.size(1), KH = weight.size(3), KW = weight.size(4);
  TORCH_CHECK(O >= 1, t.fn, ": weight must have at least one output channel, got sizes ",
              weight.sizes());
  check_geometry(t, x.size(2), x.size(3), x.size(4), KH, KW, ph, pw);
  if (bias.has_value()) {
    check_float(t, *bias, "bias", {2});
    TORCH_CHECK(bias->size(0) == x.size(0) && bias->size(1) == O, t.fn, ": bias must be (S, O) = (",
                x.size(0), ", ", O, "), got sizes ", bias->sizes());
  }
  const ConvDims d = conv_dims(x, O, KH, KW, ph, pw);
  at::Tensor y = alloc({d.S, d.B, d.O, d.Ho, d.Wo}, x.options());
  if (y.numel() == 0) return y;
  const int ckk = static_cast<int>(d.C * KH * KW);
  std::vector<int> off(ckk);
  for (int64_t c = 0; c < d.C; ++c)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw)
        off[(c * KH + kh) * KW + kw] = static_cast<int>((c * d.Hp + kh) * d.Wp + kw);
  const float* xd = x.data_ptr<float>();
  const float* wd = weight.data_ptr<float>();
  const float* bd = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  const int64_t img = d.C * d.H * d.W, pimg = d.C * d.Hp * d.Wp, oimg = d.O * d.Ho * d.Wo;
  at::parallel_for(0, d.S * d.B, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> xp(pimg);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t s = n / d.B;
      pad_images(xd + n * img, 1, d.C, d.H, d.W, d.ph, d.pw, d.Hp, d.Wp, xp.data());
      const float* ws = wd + s * d.O * ckk;
      const float* bs = bd ? bd + s * d.O : nullptr;
      auto* run = isa == 2 ? &avx512::fwd_image : &avx2::fwd_image;
      run(xp.data(), off.data(), ckk, ws, bs, static_cast<int>(d.O), yd + n * oimg,
          static_cast<int>(d.Ho), static_cast<int>(d.Wo), d.Wp);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv2d_direct_dw(const at::Tensor& grad_y, const at::Tensor& x,
                                                    int64_t KH, int64_t KW, int64_t ph,
                                                    int64_t pw, bool need_bias, int64_t isa_arg) {
  const Target t{"conv2d_direct_dw_cpu", c10::DeviceType::CPU, {at::kFloat}};
  const int isa = resolve_isa(t, isa_arg);
  check_float(t, x, "x", {5});
  check_float(t, grad_y, "grad_y", {5});
  TORCH_CHECK(grad_y.size(2) >= 1, t.fn, ": grad_y must have at least one channel, got sizes ",
              grad_y.sizes());
  check_geometry(t, x.size(2), x.size(3), x.size(4), KH, KW, ph, pw);
  const ConvDims d = conv_dims(x, grad_y.size(2), KH, KW, ph, pw);
  TORCH_CHECK(grad_y.size(0) == d.S && grad_y.size(1) == d.B && grad_y.size(3) == d.Ho &&
                  grad_y.size(4) == d.Wo,
              t.fn, ": grad_y must be (S, B, O, Ho, Wo) = (", d.S, ", ", d.B, ", O, ", d.Ho, ", ",
              d.Wo, ") for x of sizes ", x.sizes(), ", got sizes ", grad_y.sizes());
  const int64_t wsz = d.O * d.C * KH * KW;
  // G partial sums per member (image groups), each written by one task, then added: ~8 tasks
  // per thread, so that the threads' shares differ by little
  constexpr int64_t kChunk = 2;  // images per pass: their padded planes and dy stay in L1/L2
  const int64_t G = std::max<int64_t>(
      1, std::min<int64_t>((d.B + kChunk - 1) / kChunk,
                           (8 * at::get_num_threads() + d.S - 1) / std::max<int64_t>(d.S, 1)));
  at::Tensor part = at::zeros({d.S, G, wsz + d.O}, x.options());
  if (d.S > 0 && d.B > 0 && d.O > 0) {
    const float* xd = x.data_ptr<float>();
    const float* gd = grad_y.data_ptr<float>();
    float* pd = part.data_ptr<float>();
    const int64_t img = d.C * d.H * d.W, pimg = d.C * d.Hp * d.Wp, oimg = d.O * d.Ho * d.Wo;
    at::parallel_for(0, d.S * G, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> xp(kChunk * pimg);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t s = task / G, g = task % G;
        const int64_t b0 = d.B * g / G, b1 = d.B * (g + 1) / G;
        float* dw = pd + task * (wsz + d.O);
        float* db = need_bias ? dw + wsz : nullptr;
        for (int64_t b = b0; b < b1; b += kChunk) {
          const int64_t nb = std::min(kChunk, b1 - b), n = s * d.B + b;
          pad_images(xd + n * img, nb, d.C, d.H, d.W, d.ph, d.pw, d.Hp, d.Wp, xp.data());
          auto* run = isa == 2 ? &avx512::dw_dispatch : &avx2::dw_dispatch;
          run(static_cast<int>(KW), xp.data(), gd + n * oimg, static_cast<int>(nb),
              static_cast<int>(d.C), static_cast<int>(d.O), static_cast<int>(KH), d.Hp, d.Wp,
              static_cast<int>(d.Ho), static_cast<int>(d.Wo), dw, db);
        }
      }
    });
  }
  at::Tensor total = part.sum(1);
  at::Tensor dweight = total.narrow(1, 0, wsz).reshape({d.S, d.O, d.C, KH, KW}).contiguous();
  at::Tensor dbias = need_bias ? total.narrow(1, wsz, d.O).contiguous() : at::Tensor();
  return {dweight, dbias};
}

#else  // no vector kernels on this compiler / architecture

int64_t conv2d_direct_isa() { return 0; }

at::Tensor conv2d_direct_fwd(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                             int64_t, int64_t) {
  TORCH_CHECK(false, "conv2d_direct_fwd_cpu: not built on this compiler/architecture (x86-64 "
              "GCC only); conv2d_direct_isa() is 0");
}

std::tuple<at::Tensor, at::Tensor> conv2d_direct_dw(const at::Tensor&, const at::Tensor&, int64_t,
                                                    int64_t, int64_t, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "conv2d_direct_dw_cpu: not built on this compiler/architecture (x86-64 "
              "GCC only); conv2d_direct_isa() is 0");
}

#endif

}  // namespace cpu
}  // namespace faststeal
