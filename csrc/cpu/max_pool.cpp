// max_pool2d on the CPU over non-overlapping k x k windows (stride k, no padding, dilation 1,
// floor mode) of a contiguous NCHW float32 / float64 / bfloat16 tensor: the pooling of the zoo's
// CNNs and of most user CNNs (nn.MaxPool2d(2)). It exists because ATen's CPU
// max_pool2d_with_indices on NCHW costs ~10x one elementwise pass over its input (it writes int64
// indices from a loop that does not vectorize; measured on a 2-vCPU Intel Xeon, family 6 model
// 207, AVX-512/AMX: docs/benchmarks.md, "The CNN pooling and the op-call overhead"). float16 is
// left to ATen (faststeal/ops/cpp_backend.py).
//
// Semantics are ATen's, bit for bit (tests/test_ops_cpp.py compares the bits; bfloat16 NaN
// payloads aside): each window is scanned row-major and an element replaces the running maximum
// iff it is greater or NaN (so ties keep the first maximum and a NaN wins, the last NaN of the
// window when there are several; an all -inf window picks its first element). The forward writes
// that element's value (a bfloat16 NaN as the canonical 0x7FC0, as ATen's forward; its own
// conversions elsewhere keep or drop payloads depending on the code path). The backward finds
// the element again in x (no index tensor is stored) and gives it 0 + g (ATen accumulates into
// zeros: a -0 gradient becomes +0, a signalling NaN quiet); every other element, including
// rows/columns the floor mode drops, gets +0.
//
// With relu=true the op is max_pool2d(relu(x)) in one pass, computed from the pooled maximum m of
// x (max commutes with relu): where m > 0 or NaN it is m; elsewhere every relu'd element is a
// zero and ATen's scan keeps the first, relu(first element): -0 if that element is -0 (torch.relu
// keeps -0), else +0. The gradient is that of pooling relu's output: the picked element gets g
// where m is not <= 0 (relu's backward), else nothing does.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "vec_math.h"

// Our compares never trap (no FP exceptions are enabled): let GCC turn the selects of the scalar
// 2x2 rows (float64, rows of fewer than 4 windows) into vector blends (under the default
// -ftrapping-math it keeps them as branches).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace faststeal {
namespace cpu {
namespace {

constexpr int64_t kGrainRows = 64;  // output rows per parallel chunk

struct PoolDims {
  int64_t planes, H, W, OH, OW;
};

PoolDims check_pool(const Target& t, const at::Tensor& x, int64_t k) {
  check_float(t, x, "x", {4});
  TORCH_CHECK(k >= 1, t.fn, ": kernel_size must be >= 1, got ", k);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= k && W >= k, t.fn, ": x's height and width (sizes ", x.sizes(),
              ") must be at least kernel_size ", k);
  return {x.size(0) * x.size(1), H, W, H / k, W / k};
}

Target pool_target(const char* fn) {
  return {fn, c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16}};
}

// ATen's update rule: v replaces the running maximum m iff it is greater or NaN (v != v).
template <typename C>
inline bool takes(C v, C m) {
  return v > m || v != v;
}

// relu's backward passes the gradient unless its output is <= 0 (NaN passes); where the pooled
// maximum passes, max_pool2d(relu(x)) is that maximum.
template <typename C>
inline bool relu_passes(C v) {
  return !(v <= 0);
}

// Offset (i * W + j) of the window element ATen's scan picks, for the window at `in` (any k).
template <typename T>
inline int64_t window_argmax(const T* in, int64_t W, int64_t k) {
  using C = at::opmath_type<T>;
  C best = -std::numeric_limits<C>::infinity();
  int64_t arg = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const C v = static_cast<C>(in[i * W + j]);
      if (takes(v, best)) {
        best = v;
        arg = i * W + j;
      }
    }
  }
  return arg;
}

// The scalar 2x2 rows (float64; float32 and bfloat16 rows of fewer than 4 windows or without
// GCC's vector extensions, bfloat16 widened to float32 first) work on the raw bits: the selected
// element is copied, the compares run on the values, and every select is an integer mask.
template <typename T> struct RawOf;
template <> struct RawOf<float> { using type = uint32_t; };
template <> struct RawOf<double> { using type = uint64_t; };

template <typename T, typename R>
inline T value_of(R raw) {
  T v;
  std::memcpy(&v, &raw, sizeof(v));
  return v;
}

template <typename R, typename T>
inline R raw_of(T value) {
  R r;
  std::memcpy(&r, &value, sizeof(r));
  return r;
}

// raw if keep else the bits of +0
template <typename R>
inline R keep_or_zero(bool keep, R raw) {
  return raw & static_cast<R>(R(0) - static_cast<R>(keep));
}

// One output row of 2x2 windows (input rows r0, r1): the scan unrolled into selects. Starting
// from the first element equals ATen's start at -inf (the first element either takes it or is
// -inf itself).
template <typename T, bool kRelu, typename R = typename RawOf<T>::type>
FS_INLINE void pool_row2(const R* __restrict__ r0, const R* __restrict__ r1,
                         R* __restrict__ out, int64_t OW) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const R a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
    T m = value_of<T>(a);
    R v = a;
    const T fb = value_of<T>(b), fc = value_of<T>(c), fd = value_of<T>(d);
    const bool tb = takes(fb, m);
    m = tb ? fb : m;
    v = tb ? b : v;
    const bool tc = takes(fc, m);
    m = tc ? fc : m;
    v = tc ? c : v;
    const bool td = takes(fd, m);
    m = td ? fd : m;
    v = td ? d : v;
    if constexpr (kRelu) {  // m, else relu(first element): -0 stays -0, anything else +0
      constexpr R kNegZero = R(1) << (8 * sizeof(R) - 1);
      const bool pass = relu_passes(m);
      v = keep_or_zero(pass, v) | keep_or_zero(!pass && a == kNegZero, a);
    }
    out[ow] = v;
  }
}

// The gradient of one output row of 2x2 windows: the element the scan picks gets g (a -0 as +0),
// the three others +0 (written, so dx needs no separate zero fill).
template <typename T, bool kRelu, typename R = typename RawOf<T>::type>
FS_INLINE void unpool_row2(const R* __restrict__ r0, const R* __restrict__ r1,
                           const R* __restrict__ g, R* __restrict__ d0, R* __restrict__ d1,
                           int64_t OW) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    T m = value_of<T>(r0[2 * ow]);
    const T fb = value_of<T>(r0[2 * ow + 1]), fc = value_of<T>(r1[2 * ow]),
            fd = value_of<T>(r1[2 * ow + 1]);
    const bool tb = takes(fb, m);
    m = tb ? fb : m;
    const bool tc = takes(fc, m);
    m = tc ? fc : m;
    const bool td = takes(fd, m);
    m = td ? fd : m;
    // ATen accumulates into zeros, 0 + g: -0 becomes +0, a signalling NaN quiet (and a
    // denormal 0 under flush-to-zero, as there)
    R gv = raw_of<R>(value_of<T>(g[ow]) + T(0));
    if constexpr (kRelu) gv = keep_or_zero(relu_passes(m), gv);
    // the last element that took the maximum is the one the scan picks
    d1[2 * ow + 1] = keep_or_zero(td, gv);
    d1[2 * ow] = keep_or_zero(tc && !td, gv);
    d0[2 * ow + 1] = keep_or_zero(tb && !tc && !td, gv);
    d0[2 * ow] = keep_or_zero(!(tb || tc || td), gv);
  }
}

// float32 and bfloat16 2x2 rows, N windows per vector step with GCC vector extensions: each step
// loads 2N elements of both rows (bfloat16 widened to float32 in registers), splits them into
// the windows' a b / c d elements and runs the scan above as lane-wise compares and selects
// (selects copy bits, so NaN payloads and signed zeros stay what the scalar code gives). Rows of
// the zoo's maps are short (OW = 14, 5): instead of a scalar remainder the last step re-runs the
// row's final N windows, overlapping the previous step (same values written twice). On that Intel
// Xeon host (AVX2 clone, 2 threads, the lenet pools): float32 forward ~4x, backward ~3.5x the
// scalar rows (whose loops GCC vectorizes only for OW >= 8, with de-interleaves and a scalar
// tail); bfloat16 ~1.6x / 1.1-1.4x the widened scalar rows (docs/benchmarks.md, "The pooling
// rows vectorised").
#if defined(__GNUC__) && !defined(__clang__)
#define FS_POOL_VEC 1
// vector values only pass between inlined functions (for the rest of this file: GCC reports
// -Wpsabi where the templates are instantiated, at its end)
#pragma GCC diagnostic ignored "-Wpsabi"

template <int N>
struct VecF {
  static_assert(N == 4 || N == 8, "split and interleave have the shuffles of 4 and 8 lanes");
  typedef float F __attribute__((vector_size(4 * N)));
  typedef int32_t I __attribute__((vector_size(4 * N)));
  typedef uint32_t U __attribute__((vector_size(4 * N)));
  typedef uint16_t H __attribute__((vector_size(2 * N)));  // N bfloat16 elements
};

// N float32 values from N float32 (raw bits) or bfloat16 elements (widened: exact)
template <int N, typename Raw>
FS_INLINE typename VecF<N>::F load_vec(const Raw* p) {
  static_assert(std::is_same_v<Raw, uint32_t> || std::is_same_v<Raw, uint16_t>);
  using F = typename VecF<N>::F;
  if constexpr (sizeof(Raw) == 4) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    using H = typename VecF<N>::H;
    using U = typename VecF<N>::U;
    H h;
    std::memcpy(&h, p, sizeof(h));
    return (F)(__builtin_convertvector(h, U) << 16);
  }
}

// stores N values loaded by load_vec (bfloat16: the high halves, exact for them; a NaN as the
// canonical 0x7FC0, as `narrow` below)
template <int N, typename Raw>
FS_INLINE void store_vec(Raw* p, const typename VecF<N>::F& v) {
  static_assert(std::is_same_v<Raw, uint32_t> || std::is_same_v<Raw, uint16_t>);
  if constexpr (sizeof(Raw) == 4) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    using H = typename VecF<N>::H;
    using U = typename VecF<N>::U;
    const U u = (U)v;
    const U nan = (U)((u & 0x7FFFFFFFu) > 0x7F800000u);
    const H h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & (u >> 16)), H);
    std::memcpy(p, &h, sizeof(h));
  }
}

// the even (kOdd = 0) or odd elements of the 2N elements lo, hi
template <int N, int kOdd>
FS_INLINE typename VecF<N>::F split(const typename VecF<N>::F& lo,
                                    const typename VecF<N>::F& hi) {
  using I = typename VecF<N>::I;
  if constexpr (N == 8) {
    return __builtin_shuffle(lo, hi, I{kOdd, 2 + kOdd, 4 + kOdd, 6 + kOdd, 8 + kOdd, 10 + kOdd,
                                       12 + kOdd, 14 + kOdd});
  } else {
    return __builtin_shuffle(lo, hi, I{kOdd, 2 + kOdd, 4 + kOdd, 6 + kOdd});
  }
}

// element i of e, then element i of o, for i in [kHalf * N / 2, (kHalf + 1) * N / 2)
template <int N, int kHalf>
FS_INLINE typename VecF<N>::F interleave(const typename VecF<N>::F& e,
                                         const typename VecF<N>::F& o) {
  using I = typename VecF<N>::I;
  constexpr int h = kHalf * N / 2;
  if constexpr (N == 8) {
    return __builtin_shuffle(e, o, I{h, h + 8, h + 1, h + 9, h + 2, h + 10, h + 3, h + 11});
  } else {
    return __builtin_shuffle(e, o, I{h, h + 4, h + 1, h + 5});
  }
}

// The four elements of N windows and the scan's masks: t_ (b, c, d took the running maximum) and
// the maximum m.
template <int N>
struct Windows {
  typename VecF<N>::F a, m;
  typename VecF<N>::I tb, tc, td;
};

template <int N, typename Raw>
FS_INLINE Windows<N> scan_windows(const Raw* r0, const Raw* r1) {
  using F = typename VecF<N>::F;
  const F t0 = load_vec<N>(r0), t1 = load_vec<N>(r0 + N);
  const F u0 = load_vec<N>(r1), u1 = load_vec<N>(r1 + N);
  const F a = split<N, 0>(t0, t1), b = split<N, 1>(t0, t1);
  const F c = split<N, 0>(u0, u1), d = split<N, 1>(u0, u1);
  Windows<N> w;
  w.a = a;
  w.tb = (b > a) | (b != b);
  F m = w.tb ? b : a;
  w.tc = (c > m) | (c != c);
  m = w.tc ? c : m;
  w.td = (d > m) | (d != d);
  w.m = w.td ? d : m;
  return w;
}

template <int N, bool kRelu, typename Raw>
FS_INLINE void pool_vec(const Raw* r0, const Raw* r1, Raw* out) {
  using F = typename VecF<N>::F;
  using I = typename VecF<N>::I;
  const Windows<N> w = scan_windows<N>(r0, r1);
  F v = w.m;
  if constexpr (kRelu) {  // m, else relu(a): -0 stays -0, anything else +0
    const I ai = (I)w.a;  // a vector cast reinterprets the bits
    const I first = ai & (ai == INT32_MIN);  // the bits of a if a is -0, else of +0
    v = ~(w.m <= 0.0f) ? w.m : (F)first;
  }
  store_vec<N>(out, v);
}

template <int N, bool kRelu, typename Raw>
FS_INLINE void unpool_vec(const Raw* r0, const Raw* r1, const Raw* g, Raw* d0, Raw* d1) {
  using F = typename VecF<N>::F;
  const Windows<N> w = scan_windows<N>(r0, r1);
  F gv = load_vec<N>(g) + 0.0f;  // ATen's 0 + g: -0 becomes +0, a signalling NaN quiet
  if constexpr (kRelu) gv = ~(w.m <= 0.0f) ? gv : F{};
  const F zero{};
  const F gd = w.td ? gv : zero;
  const F gc = (w.tc & ~w.td) ? gv : zero;
  const F gb = (w.tb & ~w.tc & ~w.td) ? gv : zero;
  const F ga = (w.tb | w.tc | w.td) ? zero : gv;
  store_vec<N>(d0, interleave<N, 0>(ga, gb));
  store_vec<N>(d0 + N, interleave<N, 1>(ga, gb));
  store_vec<N>(d1, interleave<N, 0>(gc, gd));
  store_vec<N>(d1 + N, interleave<N, 1>(gc, gd));
}

// A row's OW >= N windows in blocks of N, the last one overlapping the one before when N does
// not divide OW (the windows it recomputes get the same values again).
template <int N, bool kRelu, typename Raw>
FS_INLINE void pool_blocks(const Raw* r0, const Raw* r1, Raw* out, int64_t OW) {
  int64_t ow = 0;
  for (; ow + N <= OW; ow += N) pool_vec<N, kRelu>(r0 + 2 * ow, r1 + 2 * ow, out + ow);
  if (ow < OW) {
    ow = OW - N;
    pool_vec<N, kRelu>(r0 + 2 * ow, r1 + 2 * ow, out + ow);
  }
}

template <int N, bool kRelu, typename Raw>
FS_INLINE void unpool_blocks(const Raw* r0, const Raw* r1, const Raw* g, Raw* d0, Raw* d1,
                             int64_t OW) {
  int64_t ow = 0;
  for (; ow + N <= OW; ow += N) {
    unpool_vec<N, kRelu>(r0 + 2 * ow, r1 + 2 * ow, g + ow, d0 + 2 * ow, d1 + 2 * ow);
  }
  if (ow < OW) {
    ow = OW - N;
    unpool_vec<N, kRelu>(r0 + 2 * ow, r1 + 2 * ow, g + ow, d0 + 2 * ow, d1 + 2 * ow);
  }
}
#endif

#ifdef FS_POOL_VEC
constexpr int64_t kVecMinWindows = 4;  // rows of fewer windows run the scalar code
#else
constexpr int64_t kVecMinWindows = std::numeric_limits<int64_t>::max();
#endif

// One 2x2 output row by vector steps (float32 raw bits or bfloat16 elements); false where they
// do not apply (fewer than kVecMinWindows windows): the caller runs the scalar row.
template <bool kRelu, typename Raw>
FS_INLINE bool pool_row2_vec([[maybe_unused]] const Raw* r0, [[maybe_unused]] const Raw* r1,
                             [[maybe_unused]] Raw* out, [[maybe_unused]] int64_t OW) {
#ifdef FS_POOL_VEC
  static_assert(kVecMinWindows == 4);
  if (OW >= 8) {
    pool_blocks<8, kRelu>(r0, r1, out, OW);
    return true;
  }
  if (OW >= kVecMinWindows) {
    pool_blocks<4, kRelu>(r0, r1, out, OW);
    return true;
  }
#endif
  return false;
}

template <bool kRelu, typename Raw>
FS_INLINE bool unpool_row2_vec([[maybe_unused]] const Raw* r0, [[maybe_unused]] const Raw* r1,
                               [[maybe_unused]] const Raw* g, [[maybe_unused]] Raw* d0,
                               [[maybe_unused]] Raw* d1, [[maybe_unused]] int64_t OW) {
#ifdef FS_POOL_VEC
  static_assert(kVecMinWindows == 4);
  if (OW >= 8) {
    unpool_blocks<8, kRelu>(r0, r1, g, d0, d1, OW);
    return true;
  }
  if (OW >= kVecMinWindows) {
    unpool_blocks<4, kRelu>(r0, r1, g, d0, d1, OW);
    return true;
  }
#endif
  return false;
}

// The scalar bfloat16 rows run through the float32 code: widening is exact (the bits shifted
// up); narrowing the selected values back is too (their low bits are 0), except that a NaN
// becomes the canonical 0x7FC0 as in ATen's float -> bfloat16 rounding.
FS_INLINE void widen(const uint16_t* __restrict__ src, uint32_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
}
FS_INLINE void narrow(const uint32_t* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = src[i];
    dst[i] = (v & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(v >> 16);
  }
}

template <typename T, bool kRelu>
FS_CLONES_AVX2
void pool_rows(const T* x, T* y, const PoolDims d, int64_t k, int64_t r0, int64_t r1) {
  using C = at::opmath_type<T>;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  // float rows for the scalar bfloat16 2x2 rows only (the vector steps need none)
  std::vector<uint32_t> buf(kBf16 && k == 2 && d.OW < kVecMinWindows ? 2 * d.W + d.OW : 0);
  int64_t plane = r0 / d.OH, oh = r0 % d.OH;
  for (int64_t r = r0; r < r1; ++r, oh = oh + 1 == d.OH ? 0 : oh + 1) {  // r = plane * OH + oh
    plane += r > r0 && oh == 0;
    const T* in = x + (plane * d.H + oh * k) * d.W;
    T* out = y + r * d.OW;
    if (k != 2) {
      for (int64_t ow = 0; ow < d.OW; ++ow) {
        C v = static_cast<C>(in[k * ow + window_argmax(in + k * ow, d.W, k)]);
        if (kRelu && !relu_passes(v)) {  // relu(first element): -0 stays -0, else +0
          const C first = static_cast<C>(in[k * ow]);
          v = first == 0 && std::signbit(first) ? first : C(0);
        }
        out[ow] = static_cast<T>(v);  // rounded like ATen's
      }
    } else if constexpr (kBf16) {
      const uint16_t* raw = reinterpret_cast<const uint16_t*>(in);
      uint16_t* rout = reinterpret_cast<uint16_t*>(out);
      if (!pool_row2_vec<kRelu>(raw, raw + d.W, rout, d.OW)) {  // via float rows
        widen(raw, buf.data(), 2 * d.W);
        pool_row2<float, kRelu>(buf.data(), buf.data() + d.W, buf.data() + 2 * d.W, d.OW);
        narrow(buf.data() + 2 * d.W, rout, d.OW);
      }
    } else {
      using R = typename RawOf<T>::type;
      const R* raw = reinterpret_cast<const R*>(in);
      R* rout = reinterpret_cast<R*>(out);
      bool done = false;
      if constexpr (std::is_same_v<T, float>) {
        done = pool_row2_vec<kRelu>(raw, raw + d.W, rout, d.OW);
      }
      if (!done) pool_row2<T, kRelu>(raw, raw + d.W, rout, d.OW);
    }
  }
}

// dx rows [oh*k, oh*k + k) of each plane for output rows r in [r0, r1), and, for the last output
// row of a plane, the rows below it that the floor mode dropped (all zero): the chunks of
// parallel_for write disjoint rows.
template <typename T, bool kRelu>
FS_CLONES_AVX2
void unpool_rows(const T* g, const T* x, T* dx, const PoolDims d, int64_t k, int64_t r0,
                 int64_t r1) {
  using C = at::opmath_type<T>;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  std::vector<uint32_t> buf(kBf16 && k == 2 && d.OW < kVecMinWindows ? 4 * d.W + d.OW : 0);
  int64_t plane = r0 / d.OH, oh = r0 % d.OH;
  for (int64_t r = r0; r < r1; ++r, oh = oh + 1 == d.OH ? 0 : oh + 1) {
    plane += r > r0 && oh == 0;
    const int64_t base = (plane * d.H + oh * k) * d.W;
    const int64_t rows = oh == d.OH - 1 ? d.H - oh * k : k;
    const T* in = x + base;
    const T* gr = g + r * d.OW;
    if (k != 2) {
      std::fill(dx + base, dx + base + rows * d.W, T(0));
      for (int64_t ow = 0; ow < d.OW; ++ow) {
        const int64_t a = k * ow + window_argmax(in + k * ow, d.W, k);
        if (!kRelu || relu_passes(static_cast<C>(in[a]))) {
          dx[base + a] = static_cast<T>(static_cast<C>(gr[ow]) + C(0));  // ATen's 0 + g
        }
      }
      continue;
    }
    if constexpr (kBf16) {
      const uint16_t *raw = reinterpret_cast<const uint16_t*>(in),
                     *graw = reinterpret_cast<const uint16_t*>(gr);
      uint16_t* draw = reinterpret_cast<uint16_t*>(dx + base);
      if (!unpool_row2_vec<kRelu>(raw, raw + d.W, graw, draw, draw + d.W, d.OW)) {
        uint32_t *xb = buf.data(), *gb = xb + 2 * d.W, *db = gb + d.OW;  // via float rows
        widen(raw, xb, 2 * d.W);
        widen(graw, gb, d.OW);
        unpool_row2<float, kRelu>(xb, xb + d.W, gb, db, db + d.W, d.OW);
        narrow(db, draw, 2 * d.W);
      }
    } else {
      using R = typename RawOf<T>::type;
      const R *raw = reinterpret_cast<const R*>(in), *graw = reinterpret_cast<const R*>(gr);
      R* draw = reinterpret_cast<R*>(dx + base);
      bool done = false;
      if constexpr (std::is_same_v<T, float>) {
        done = unpool_row2_vec<kRelu>(raw, raw + d.W, graw, draw, draw + d.W, d.OW);
      }
      if (!done) unpool_row2<T, kRelu>(raw, raw + d.W, graw, draw, draw + d.W, d.OW);
    }
    // the column the floor mode dropped (odd W) and the row below the last window (odd H)
    for (int64_t i = 0; i < 2 && d.W > 2 * d.OW; ++i) dx[base + i * d.W + d.W - 1] = T(0);
    if (rows > 2) std::fill(dx + base + 2 * d.W, dx + base + rows * d.W, T(0));
  }
}

}  // namespace

at::Tensor max_pool2d_fwd(const at::Tensor& x, int64_t kernel_size, bool relu) {
  const Target t = pool_target("max_pool2d_fwd_cpu");
  const PoolDims d = check_pool(t, x, kernel_size);
  at::Tensor y = alloc({x.size(0), x.size(1), d.OH, d.OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool2d_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, d.planes * d.OH, kGrainRows, [&](int64_t r0, int64_t r1) {
      if (relu) pool_rows<scalar_t, true>(xp, yp, d, kernel_size, r0, r1);
      else pool_rows<scalar_t, false>(xp, yp, d, kernel_size, r0, r1);
    });
  });
  return y;
}

at::Tensor max_pool2d_bwd(const at::Tensor& grad_y, const at::Tensor& x, int64_t kernel_size,
                          bool relu) {
  const Target t = pool_target("max_pool2d_bwd_cpu");
  const PoolDims d = check_pool(t, x, kernel_size);
  check_float(t, grad_y, "grad_y", {4});
  check_like(t, grad_y, "grad_y", x, "x");
  const int64_t want[4] = {x.size(0), x.size(1), d.OH, d.OW};
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(want), t.fn, ": grad_y has sizes ",
              grad_y.sizes(), ", expected the pooled output's ", at::IntArrayRef(want));
  at::Tensor dx = alloc_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool2d_bwd_cpu", [&] {
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, d.planes * d.OH, kGrainRows, [&](int64_t r0, int64_t r1) {
      if (relu) unpool_rows<scalar_t, true>(gp, xp, dxp, d, kernel_size, r0, r1);
      else unpool_rows<scalar_t, false>(gp, xp, dxp, d, kernel_size, r0, r1);
    });
  });
  return dx;
}

}  // namespace cpu
}  // namespace faststeal
