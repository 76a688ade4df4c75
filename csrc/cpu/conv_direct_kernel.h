// The vector kernels of csrc/cpu/conv_direct.cpp, written once over a vector type V and
// included there twice: inside an AVX-512 target region (V = 16 floats in zmm registers) and an
// AVX2+FMA one (V = 8 floats in ymm registers), each in its own namespace. No include guard: it
// is meant to be included once per ISA namespace, after V, kAcc (the vector registers the
// accumulators of one block may use) and kMaxNV (vectors per forward row tile) are defined there.
//
// Layout. A padded image is C planes of Hp x Wp floats, Hp = H + 2*ph rows, the image at column
// pw, zeros around it; Wp covers the widest vector read (round_up(Wo, 64) + KW - 1). Output
// row i of channel o is the sum over (c, kh, kw) of w[o,c,kh,kw] times the padded row i+kh of
// plane c from column kw: every term a vector load at offset off[t] = (c*Hp + kh)*Wp + kw from
// the row's base, so one flat loop over t = (c, kh, kw) keeps a block's accumulators in
// registers (a nested c/kh/kw loop made GCC spill them to the stack on every iteration).

// The widest block of output channels for NV vectors per row: OB*NV accumulators + NV inputs +
// one broadcast weight must fit the register file.
constexpr int ob_max(int nv) { return (kAcc - nv - 1) / nv; }

// One tile of output row i: columns [j0, j0 + cnt) of OB channels starting at w / bias / out.
template <int NV, int OB>
inline void fwd_block(const float* base, const int* off, int ckk, const float* w,
                      const float* bias, float* out, int64_t out_stride, int cnt) {
  typename V::R acc[OB][NV];
#pragma GCC unroll 32
  for (int ob = 0; ob < OB; ++ob) {
    const typename V::R b = V::set1(bias ? bias[ob] : 0.0f);
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) acc[ob][v] = b;
  }
  for (int t = 0; t < ckk; ++t) {
    const float* row = base + off[t];
    typename V::R xv[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) xv[v] = V::loadu(row + V::L * v);
#pragma GCC unroll 32
    for (int ob = 0; ob < OB; ++ob) {
      const typename V::R wv = V::set1(w[ob * ckk + t]);
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) acc[ob][v] = V::fmadd(wv, xv[v], acc[ob][v]);
    }
  }
#pragma GCC unroll 32
  for (int ob = 0; ob < OB; ++ob)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) V::store_n(out + ob * out_stride + V::L * v, acc[ob][v],
                                            cnt - V::L * v);
}

// All O channels of one tile, in blocks of the widest size that fits (then smaller ones).
template <int NV>
void fwd_tile(const float* base, const int* off, int ckk, const float* w, const float* bias,
              int O, float* out, int64_t plane, int cnt) {
  int o = 0;
  auto run = [&](auto ob_tag) {
    constexpr int OB = decltype(ob_tag)::value;
    fwd_block<NV, OB>(base, off, ckk, w + (int64_t)o * ckk, bias ? bias + o : nullptr,
                      out + o * plane, plane, cnt);
    o += OB;
  };
#define FS_CONV_BLOCK(n)                                                 \
  if constexpr (ob_max(NV) >= n) {                                       \
    while (O - o >= n) run(std::integral_constant<int, n>{});            \
  }
  FS_CONV_BLOCK(16)
  FS_CONV_BLOCK(12)
  FS_CONV_BLOCK(8)
  FS_CONV_BLOCK(6)
  FS_CONV_BLOCK(4)
  FS_CONV_BLOCK(3)
  FS_CONV_BLOCK(2)
  FS_CONV_BLOCK(1)
#undef FS_CONV_BLOCK
}

// y (O, Ho, Wo) of one padded image xp; w (O, C, KH, KW); bias (O) or null.
inline void fwd_image(const float* xp, const int* off, int ckk, const float* w, const float* bias,
                      int O, float* y, int Ho, int Wo, int Wp) {
  const int64_t plane = (int64_t)Ho * Wo;
  for (int i = 0; i < Ho; ++i) {
    for (int j0 = 0; j0 < Wo; j0 += kMaxNV * V::L) {
      const int cnt = std::min(kMaxNV * V::L, Wo - j0);
      const int nv = (cnt + V::L - 1) / V::L;
      const float* base = xp + (int64_t)i * Wp + j0;
      float* out = y + (int64_t)i * Wo + j0;
      switch (nv) {
        case 1: fwd_tile<1>(base, off, ckk, w, bias, O, out, plane, cnt); break;
        case 2: fwd_tile<2>(base, off, ckk, w, bias, O, out, plane, cnt); break;
        case 3:
          if constexpr (kMaxNV >= 3) fwd_tile<3>(base, off, ckk, w, bias, O, out, plane, cnt);
          break;
        default:
          if constexpr (kMaxNV >= 4) fwd_tile<4>(base, off, ckk, w, bias, O, out, plane, cnt);
          break;
      }
    }
  }
}

// One tile's rows of one image into the dw_images accumulators: columns [j0, j0 + NV*L) of
// every dy row against the padded x rows at offsets kw. A partial tile (Full false: the row's
// last, past Wo) loads dy with masks (lanes past Wo zero; dy is not padded) and adds only the
// valid lanes' products (an x lane past Wo may hold an inf: 0 * inf would be NaN). Every x read
// stays inside the padded row (Wp covers a 4 x 16-float tile from a column < Wo, plus KW - 1).
template <int KW, int NV, bool Full>
__attribute__((always_inline)) inline void dw_rows(typename V::R (&acc)[KW][NV],
                                                   typename V::R& accb, bool with_db,
                                                   const float* g, const float* xc, int kh,
                                                   int Ho, int Wo, int Wp, int j0) {
  typename V::Lanes valid[NV];
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) valid[v] = V::lanes(Wo - j0 - V::L * v);
  for (int i = 0; i < Ho; ++i) {
    const float* grow = g + (int64_t)i * Wo + j0;
    const float* row = xc + (int64_t)(i + kh) * Wp + j0;
    typename V::R d[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v)
      d[v] = Full ? V::loadu(grow + V::L * v) : V::load_n(grow + V::L * v, Wo - j0 - V::L * v);
    if (with_db) {
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) accb = V::add(accb, d[v]);
    }
#pragma GCC unroll 32
    for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v)
        acc[kw][v] = Full ? V::fmadd(d[v], V::loadu(row + kw + V::L * v), acc[kw][v])
                          : V::fmadd_lanes(d[v], row + kw + V::L * v, acc[kw][v], valid[v]);
  }
}

// Adds to dw (O, C, KH, KW) and, when db, to db (O) the weight and bias gradients of nb padded
// images xp (nb, C, Hp, Wp) with output gradients dy (nb, O, Ho, Wo): for each (o, c, kh) the
// KW x NV accumulators run over every row of every image, then fold into dw.
template <int KW, int NV>
void dw_images(const float* xp, const float* dy, int nb, int C, int O, int KH, int Hp, int Wp,
               int Ho, int Wo, float* dw, float* db) {
  constexpr int T = NV * V::L;
  for (int o = 0; o < O; ++o)
    for (int c = 0; c < C; ++c)
      for (int kh = 0; kh < KH; ++kh) {
        typename V::R acc[KW][NV];
#pragma GCC unroll 32
        for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 32
          for (int v = 0; v < NV; ++v) acc[kw][v] = V::zero();
        typename V::R accb = V::zero();
        const bool with_db = db && c == 0 && kh == 0;
        for (int n = 0; n < nb; ++n) {
          const float* g = dy + ((int64_t)n * O + o) * Ho * Wo;
          const float* xc = xp + ((int64_t)n * C + c) * Hp * Wp;
          for (int j0 = 0; j0 < Wo; j0 += T) {
            if (j0 + T <= Wo)
              dw_rows<KW, NV, true>(acc, accb, with_db, g, xc, kh, Ho, Wo, Wp, j0);
            else
              dw_rows<KW, NV, false>(acc, accb, with_db, g, xc, kh, Ho, Wo, Wp, j0);
          }
        }
        float* dwk = dw + (((int64_t)o * C + c) * KH + kh) * KW;
#pragma GCC unroll 32
        for (int kw = 0; kw < KW; ++kw) {
          typename V::R s = acc[kw][0];
#pragma GCC unroll 32
          for (int v = 1; v < NV; ++v) s = V::add(s, acc[kw][v]);
          dwk[kw] += V::sum(s);
        }
        if (with_db) db[o] += V::sum(accb);
      }
}

// The vectors per dy row tile of dw_images: as many as the row needs, at most what KW*NV
// accumulators leave of the register file, one of 1, 2, 4.
inline int dw_vectors(int KW, int Wo) {
  const int need = (Wo + V::L - 1) / V::L, fit = std::max(1, (kAcc - 4) / KW);
  const int nv = std::min(need, fit);
  return nv >= 4 ? 4 : (nv >= 2 ? 2 : 1);
}

template <int KW>
void dw_images_kw(int nv, const float* xp, const float* dy, int nb, int C, int O, int KH, int Hp,
                  int Wp, int Ho, int Wo, float* dw, float* db) {
  switch (nv) {
    case 1: dw_images<KW, 1>(xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 2: dw_images<KW, 2>(xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    default: dw_images<KW, 4>(xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
  }
}

// dw_images for any KW in [1, kMaxKW] (the accumulators are indexed by kw at compile time).
inline void dw_dispatch(int KW, const float* xp, const float* dy, int nb, int C, int O, int KH,
                        int Hp, int Wp, int Ho, int Wo, float* dw, float* db) {
  const int nv = dw_vectors(KW, Wo);
  switch (KW) {
    case 1: dw_images_kw<1>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 2: dw_images_kw<2>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 3: dw_images_kw<3>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 4: dw_images_kw<4>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 5: dw_images_kw<5>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    case 6: dw_images_kw<6>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
    default: dw_images_kw<7>(nv, xp, dy, nb, C, O, KH, Hp, Wp, Ho, Wo, dw, db); break;
  }
}
