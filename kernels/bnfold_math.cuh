// Per-element logic of the fold, shared by the CUDA kernels (bnfold.cu) and the host tests, which
// compile this header for the CPU and compare it with the NumPy backend.
//
// Every array a fold touches is viewed as (groups, rows, channels, inner) in C order; the BN channel of
// flat element e is  group * channels + (e / inner) % channels,  group = e / (inner * channels * rows)
// (bnfold_gpu/layout.py documents each layer's layout).
//
// Arithmetic is spelled with explicit round-to-nearest operations so that the device does not
// contract a*b+c into one fused multiply-add: results then match NumPy bit for bit.
#pragma once

#ifdef __CUDACC__
#define BNFOLD_HD __host__ __device__ __forceinline__
#else
#define BNFOLD_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define BNFOLD_DMUL(a, b) __dmul_rn((a), (b))
#define BNFOLD_DADD(a, b) __dadd_rn((a), (b))
#define BNFOLD_DSUB(a, b) __dsub_rn((a), (b))
#define BNFOLD_DDIV(a, b) __ddiv_rn((a), (b))
// float32 work in PTX: CuPy compiles every kernel with -ftz=true, which would flush subnormal
// float32 inputs and results to zero (NumPy keeps them); these spell the IEEE operations.
__device__ __forceinline__ float BNFOLD_FMUL(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float BNFOLD_D2F(double a) {
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
  return r;
}
__device__ __forceinline__ double BNFOLD_F2D(float a) {
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
  return r;
}
#else
#include <cmath>
using std::isfinite;
using std::sqrt;
#define BNFOLD_DMUL(a, b) ((a) * (b))
#define BNFOLD_DADD(a, b) ((a) + (b))
#define BNFOLD_DSUB(a, b) ((a) - (b))
#define BNFOLD_DDIV(a, b) ((a) / (b))
#define BNFOLD_FMUL(a, b) ((a) * (b))
#define BNFOLD_D2F(a) ((float)(a))
#define BNFOLD_F2D(a) ((double)(a))
#endif

typedef long long bnfold_i64;
typedef unsigned long long bnfold_u64;
typedef unsigned int bnfold_u32;
typedef unsigned short bnfold_u16;

// Threads per block; weight elements per thread of a block (a block looks its layer up once, so
// more elements per block spend less on the lookup; the host tables count blocks of BNFOLD_CHUNK,
// see segments.py); weight elements a thread loads before it stores. The GPU benchmark compares
// builds with -DBNFOLD_PER_THREAD=n -DBNFOLD_UNROLL=m.
#define BNFOLD_BLOCK 256
#ifndef BNFOLD_PER_THREAD
#define BNFOLD_PER_THREAD 16
#endif
#define BNFOLD_CHUNK (BNFOLD_BLOCK * BNFOLD_PER_THREAD)
#ifndef BNFOLD_UNROLL
#define BNFOLD_UNROLL 4
#endif
#if BNFOLD_UNROLL > BNFOLD_PER_THREAD
#error "BNFOLD_UNROLL exceeds BNFOLD_PER_THREAD"
#endif

// dtype codes used in the segment tables
enum { BNFOLD_F16 = 0, BNFOLD_F32 = 1, BNFOLD_F64 = 2 };

// status bits a channel segment reports (bnfold_gpu/backends/segments.py names them)
enum {
  BNFOLD_VAR_NONFINITE = 1, BNFOLD_VAR_NEGATIVE = 2, BNFOLD_VAR_EPS_ZERO = 4,
  BNFOLD_MEAN_NONFINITE = 8, BNFOLD_GAMMA_NONFINITE = 16, BNFOLD_BETA_NONFINITE = 32,
  BNFOLD_SCALE_NONFINITE = 64, BNFOLD_OFFSET_NONFINITE = 128
};

template <typename I>
BNFOLD_HD I bnfold_channel(I e, I inner, I channels, I rows) {
  I group = e / (inner * channels * rows);
  return group * channels + (e / inner) % channels;
}

// Division by a divisor fixed per segment, as a multiply-high and a shift (Granlund-Montgomery; the
// host packs magic | shift << 32, see segments.py). Exact for dividends below 2^31, which the 32-bit
// path guarantees; it spares the weight kernel two integer divisions per element.
BNFOLD_HD bnfold_u32 bnfold_umulhi(bnfold_u32 a, bnfold_u32 b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (bnfold_u32)(((bnfold_u64)a * b) >> 32);
#endif
}

BNFOLD_HD bnfold_u32 bnfold_fastdiv(bnfold_u32 n, bnfold_u64 packed) {
  return (bnfold_umulhi(n, (bnfold_u32)packed) + n) >> (bnfold_u32)(packed >> 32);
}

// ---- float16 <-> float32 (round to nearest even), as NumPy converts ----------------------------
BNFOLD_HD bnfold_u32 bnfold_f2u(float f) { union { float f; bnfold_u32 u; } v; v.f = f; return v.u; }
BNFOLD_HD float bnfold_u2f(bnfold_u32 u) { union { float f; bnfold_u32 u; } v; v.u = u; return v.f; }

// On the device these are the hardware conversions, which are IEEE (exact one way, round to nearest
// even the other) and so give NumPy's bits for every value but NaN payloads; the bit-level code below
// spells NumPy's algorithm for the host, where the tests hold it against NumPy on every bit pattern.
BNFOLD_HD float bnfold_half_to_float(bnfold_u16 h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  bnfold_u32 sign = (bnfold_u32)(h & 0x8000u) << 16;
  bnfold_u32 exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    float v = BNFOLD_FMUL((float)mant, 5.9604644775390625e-8f);
    return bnfold_u2f(bnfold_f2u(v) | sign);
  }
  if (exp == 31) return bnfold_u2f(sign | 0x7f800000u | (mant << 13));
  return bnfold_u2f(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

BNFOLD_HD bnfold_u16 bnfold_float_to_half(float value) {
#if defined(__CUDA_ARCH__)
  bnfold_u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(value));
  return h;
#else
  bnfold_u32 f = bnfold_f2u(value);
  bnfold_u16 h_sgn = (bnfold_u16)((f & 0x80000000u) >> 16);
  bnfold_u32 f_exp = f & 0x7f800000u, f_sig;
  if (f_exp >= 0x47800000u) {  // overflow, inf or nan
    if (f_exp == 0x7f800000u) {
      f_sig = f & 0x007fffffu;
      if (f_sig != 0) {
        bnfold_u16 ret = (bnfold_u16)(0x7c00u + (f_sig >> 13));
        if (ret == 0x7c00u) ret++;
        return (bnfold_u16)(h_sgn + ret);
      }
    }
    return (bnfold_u16)(h_sgn + 0x7c00u);
  }
  if (f_exp <= 0x38000000u) {  // subnormal half or zero
    if (f_exp < 0x33000000u) return h_sgn;
    f_exp >>= 23;
    f_sig = 0x00800000u + (f & 0x007fffffu);
    f_sig >>= (113u - f_exp);
    if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) f_sig += 0x00001000u;
    return (bnfold_u16)(h_sgn + (bnfold_u16)(f_sig >> 13));
  }
  bnfold_u16 h_exp = (bnfold_u16)((f_exp - 0x38000000u) >> 13);
  f_sig = f & 0x007fffffu;
  if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;
  bnfold_u16 h_sig = (bnfold_u16)(f_sig >> 13);
  h_sig = (bnfold_u16)(h_sig + h_exp);
  return (bnfold_u16)(h_sgn + h_sig);
#endif
}

BNFOLD_HD double bnfold_load(const void* p, int dtype, bnfold_i64 i) {
  if (dtype == BNFOLD_F16) return BNFOLD_F2D(bnfold_half_to_float(((const bnfold_u16*)p)[i]));
  if (dtype == BNFOLD_F32) return BNFOLD_F2D(((const float*)p)[i]);
  return ((const double*)p)[i];
}

// Stores a float64 result: float32 directly, float16 through float32 (as the NumPy backend does).
BNFOLD_HD void bnfold_store(void* p, int dtype, bnfold_i64 i, double v) {
  if (dtype == BNFOLD_F16) ((bnfold_u16*)p)[i] = bnfold_float_to_half(BNFOLD_D2F(v));
  else if (dtype == BNFOLD_F32) ((float*)p)[i] = BNFOLD_D2F(v);
  else ((double*)p)[i] = v;
}

// ---- the fold math ---------------------------------------------------------------------------
// scale = gamma / sqrt(var + eps); offset = beta - mean * scale; returns status bits.
BNFOLD_HD int bnfold_scale_offset(double gamma, double beta, double mean, double var, double eps,
                                  double* scale, double* offset) {
  int status = 0;
  if (!isfinite(var)) status |= BNFOLD_VAR_NONFINITE;
  else if (var < 0) status |= BNFOLD_VAR_NEGATIVE;
  else if (BNFOLD_DADD(var, eps) <= 0) status |= BNFOLD_VAR_EPS_ZERO;
  if (!isfinite(mean)) status |= BNFOLD_MEAN_NONFINITE;
  if (!isfinite(gamma)) status |= BNFOLD_GAMMA_NONFINITE;
  if (!isfinite(beta)) status |= BNFOLD_BETA_NONFINITE;
  double s = BNFOLD_DDIV(gamma, sqrt(BNFOLD_DADD(var, eps)));
  double off = BNFOLD_DSUB(beta, BNFOLD_DMUL(mean, s));
  // finite statistics can still give a map past float64's range (var + eps subnormal)
  if (!status && !isfinite(s)) status |= BNFOLD_SCALE_NONFINITE;
  else if (!status && !isfinite(off)) status |= BNFOLD_OFFSET_NONFINITE;
  *scale = s;
  *offset = off;
  return status;
}

// Whether a float64 result stays finite once stored in `dtype` (bnfold_store's rounding).
BNFOLD_HD bool bnfold_stored_finite(int dtype, double v) {
  if (dtype == BNFOLD_F16) return (bnfold_float_to_half(BNFOLD_D2F(v)) & 0x7c00u) != 0x7c00u;
  if (dtype == BNFOLD_F32) return (bnfold_f2u(BNFOLD_D2F(v)) & 0x7f800000u) != 0x7f800000u;
  return isfinite(v);
}

// Bias after folding into the layer's outputs: (bias - mean) * scale + beta.
BNFOLD_HD double bnfold_output_bias(double bias, double mean, double scale, double beta) {
  return BNFOLD_DADD(BNFOLD_DMUL(BNFOLD_DSUB(bias, mean), scale), beta);
}

// One weight element as the type its multiply runs in (float16 and float32 weights multiply in
// float32, float64 in float64), and back.
BNFOLD_HD float bnfold_get(const bnfold_u16* p, bnfold_i64 i) { return bnfold_half_to_float(p[i]); }
BNFOLD_HD float bnfold_get(const float* p, bnfold_i64 i) { return p[i]; }
BNFOLD_HD double bnfold_get(const double* p, bnfold_i64 i) { return p[i]; }
BNFOLD_HD void bnfold_put(bnfold_u16* p, bnfold_i64 i, float v) { p[i] = bnfold_float_to_half(v); }
BNFOLD_HD void bnfold_put(float* p, bnfold_i64 i, float v) { p[i] = v; }
BNFOLD_HD void bnfold_put(double* p, bnfold_i64 i, double v) { p[i] = v; }
BNFOLD_HD float bnfold_scale_of(float, const double*, const float* scale_f, bnfold_i64 c) { return scale_f[c]; }
BNFOLD_HD double bnfold_scale_of(double, const double* scale_d, const float*, bnfold_i64 c) { return scale_d[c]; }
BNFOLD_HD float bnfold_mul(float w, float s) { return BNFOLD_FMUL(w, s); }
BNFOLD_HD double bnfold_mul(double w, double s) { return BNFOLD_DMUL(w, s); }
// float32 tests on the bits: CuPy's -ftz=true makes float32 comparisons flush subnormal operands
// (harmless here, but the PTX stays free of flushing instructions, which the tests check)
BNFOLD_HD bool bnfold_finite(float v) { return (bnfold_f2u(v) & 0x7f800000u) != 0x7f800000u; }
BNFOLD_HD bool bnfold_finite(double v) { return isfinite(v); }
BNFOLD_HD bool bnfold_above_one(float v) { return (bnfold_f2u(v) & 0x7fffffffu) > 0x3f800000u; }
BNFOLD_HD bool bnfold_above_one(double v) { return v > 1.0 || v < -1.0; }
// Whether a product in the multiply's type is not finite once stored as T (float16: rounded to
// 65520 or more).
BNFOLD_HD bool bnfold_overflows(const bnfold_u16*, float r) {
  return (bnfold_float_to_half(r) & 0x7c00u) == 0x7c00u;
}
BNFOLD_HD bool bnfold_overflows(const float*, float r) { return !bnfold_finite(r); }
BNFOLD_HD bool bnfold_overflows(const double*, double r) { return !isfinite(r); }

// ---- segment tables (all fields 64-bit; bnfold_gpu/backends/segments.py packs them) ------------
struct bnfold_channel_seg {   // one BN: its statistics and where its channels go
  bnfold_u64 gamma, beta, mean, var;   // device pointers; 0: gamma 1, beta 0, mean 0, var 1
  bnfold_i64 gamma_dtype, beta_dtype, mean_dtype, var_dtype;
  double eps;
  bnfold_i64 n_channels, channel_offset, fold;
};

struct bnfold_array_seg {     // one weight (or bias): where it is, its layout, its channels
  bnfold_u64 src, dst;                 // src 0: a created bias (reads as 0)
  bnfold_i64 numel, inner, channels, rows, channel_offset, dtype, src_dtype, first_block;
  bnfold_u64 div_inner, div_channels, div_rows_channels;   // packed fast dividers (32-bit path)
};

struct bnfold_input_seg {     // one BN -> layer fold: the layer's bias takes sum(weight * offset)
  bnfold_u64 weight, bias, dst;        // bias 0: the layer had none
  bnfold_i64 weight_dtype, bias_dtype, dst_dtype;
  bnfold_i64 inner, channels, rows, channel_offset;   // the weight's layout over input channels
  // output o of group g = o / per_group sums the weight elements
  // g * group_stride + (o - g * per_group) * out_stride + j * term_stride, j < terms (one group:
  // per_group = outputs)
  bnfold_i64 outputs, out_stride, terms, term_stride, per_group, group_stride;
  bnfold_i64 first_block;              // block of this fold's output 0 (one block per output)
};

// The channel of element e < 2^31 of a segment, with its fast dividers.
BNFOLD_HD bnfold_u32 bnfold_channel_fast(const bnfold_array_seg& s, bnfold_u32 e) {
  bnfold_u32 q = bnfold_fastdiv(e, s.div_inner);
  bnfold_u32 group = bnfold_fastdiv(q, s.div_rows_channels);
  bnfold_u32 c = q - bnfold_fastdiv(q, s.div_channels) * (bnfold_u32)s.channels;
  return group * (bnfold_u32)s.channels + c;
}

// Binary search: the last segment whose start (field read by key) is <= value.
template <typename Seg, typename Key>
BNFOLD_HD int bnfold_find_segment(const Seg* segs, int n, bnfold_i64 value, Key key) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (key(segs[mid]) <= value) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The per-channel stage for global channel index c.
BNFOLD_HD int bnfold_channel_stage(const bnfold_channel_seg* segs, int n_segs, bnfold_i64 c,
                                   double* scale_d, float* scale_f, double* offset, double* mean_d,
                                   double* beta_d, int* fold) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_channel_seg& s) const { return s.channel_offset; } };
  const bnfold_channel_seg& s = segs[bnfold_find_segment(segs, n_segs, c, K())];
  bnfold_i64 i = c - s.channel_offset;
  double gamma = s.gamma ? bnfold_load((const void*)s.gamma, (int)s.gamma_dtype, i) : 1.0;
  double beta = s.beta ? bnfold_load((const void*)s.beta, (int)s.beta_dtype, i) : 0.0;
  // a derived map has no mean and var: 0 and 1 (with eps 0, its scale and shift pass unchanged)
  double mean = s.mean ? bnfold_load((const void*)s.mean, (int)s.mean_dtype, i) : 0.0;
  double var = s.var ? bnfold_load((const void*)s.var, (int)s.var_dtype, i) : 1.0;
  double sc, off;
  int status = bnfold_scale_offset(gamma, beta, mean, var, s.eps, &sc, &off);
  scale_d[c] = sc;
  scale_f[c] = BNFOLD_D2F(sc);
  offset[c] = off;
  mean_d[c] = mean;
  beta_d[c] = beta;
  *fold = (int)s.fold;
  return status;
}

// One bias element (output side): global element index e over all bias segments (first_block
// holds each segment's first global element here).
// flags[segment] is set where a stored bias is not finite though the layer's bias was (an overflow,
// confirmed on the host, which names it).
BNFOLD_HD void bnfold_bias_stage(const bnfold_array_seg* segs, int n_segs, bnfold_i64 e,
                                 const double* scale_d, const double* mean_d, const double* beta_d,
                                 int* flags) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_array_seg& s) const { return s.first_block; } };
  int seg = bnfold_find_segment(segs, n_segs, e, K());
  const bnfold_array_seg& s = segs[seg];
  bnfold_i64 i = e - s.first_block;
  bnfold_i64 c = s.channel_offset + bnfold_channel<bnfold_i64>(i, s.inner, s.channels, s.rows);
  double b = s.src ? bnfold_load((const void*)s.src, (int)s.src_dtype, i) : 0.0;
  double v = bnfold_output_bias(b, mean_d[c], scale_d[c], beta_d[c]);
  bnfold_store((void*)s.dst, (int)s.dtype, i, v);
  if (!bnfold_stored_finite((int)s.dtype, v) && isfinite(b)) flags[seg] = 1;
}

// One element of the copy that puts computed values in place: global element index e over all
// segments (first_block holds each segment's first global element), src and dst of one dtype.
BNFOLD_HD void bnfold_copy_stage(const bnfold_array_seg* segs, int n_segs, bnfold_i64 e) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_array_seg& s) const { return s.first_block; } };
  const bnfold_array_seg& s = segs[bnfold_find_segment(segs, n_segs, e, K())];
  bnfold_i64 i = e - s.first_block;
  if (s.dtype == BNFOLD_F16) ((bnfold_u16*)s.dst)[i] = ((const bnfold_u16*)s.src)[i];
  else if (s.dtype == BNFOLD_F32) ((float*)s.dst)[i] = ((const float*)s.src)[i];
  else ((double*)s.dst)[i] = ((const double*)s.src)[i];
}

// Channel of element i of a weight segment: 32-bit index and fast dividers below 2^31 elements,
// 64-bit division past.
struct bnfold_channel32 {
  const bnfold_array_seg& s;
  BNFOLD_HD bnfold_i64 operator()(bnfold_u32 i) const { return s.channel_offset + (bnfold_i64)bnfold_channel_fast(s, i); }
};
// One group of one row (a layer -> BN weight, the usual case): the channel is e / inner, one divider.
struct bnfold_channel32_rows1 {
  const bnfold_array_seg& s;
  BNFOLD_HD bnfold_i64 operator()(bnfold_u32 i) const {
    return s.channel_offset + (bnfold_i64)bnfold_fastdiv(i, s.div_inner);
  }
};
struct bnfold_channel64 {
  const bnfold_array_seg& s;
  BNFOLD_HD bnfold_i64 operator()(bnfold_i64 i) const {
    return s.channel_offset + bnfold_channel<bnfold_i64>(i, s.inner, s.channels, s.rows);
  }
};

// Elements [begin, end) of one weight segment, thread `thread` of the block taking every
// BNFOLD_BLOCK-th. Each thread issues BNFOLD_UNROLL loads (weight and scale) before it stores
// anything: folds may be in place (src == dst), so the compiler cannot move loads above earlier
// stores by itself, and one load in flight per thread leaves HBM bandwidth unused.
template <typename T, typename I, typename ChannelOf>
BNFOLD_HD void bnfold_rescale_range(const bnfold_array_seg& s, I begin, I end, int thread,
                                    const double* scale_d, const float* scale_f, ChannelOf channel_of) {
  typedef decltype(bnfold_get((const T*)0, 0)) W;
  const T* src = (const T*)s.src;
  T* dst = (T*)s.dst;
  for (I base = begin + (I)thread; base < end; base += (I)(BNFOLD_BLOCK * BNFOLD_UNROLL)) {
    W w[BNFOLD_UNROLL], sc[BNFOLD_UNROLL];
#pragma unroll
    for (int u = 0; u < BNFOLD_UNROLL; ++u) {
      I i = base + (I)(u * BNFOLD_BLOCK);
      w[u] = 0;
      sc[u] = 0;
      if (i < end) {
        w[u] = bnfold_get(src, i);
        sc[u] = bnfold_scale_of(W(), scale_d, scale_f, channel_of(i));
      }
    }
#pragma unroll
    for (int u = 0; u < BNFOLD_UNROLL; ++u) {
      I i = base + (I)(u * BNFOLD_BLOCK);
      if (i < end) bnfold_put(dst, i, bnfold_mul(w[u], sc[u]));
    }
  }
}

template <typename T>
BNFOLD_HD void bnfold_rescale_chunk(const bnfold_array_seg& s, bnfold_i64 begin, bnfold_i64 end,
                                    int thread, const double* scale_d, const float* scale_f) {
  if (s.numel <= 0x7fffffffLL - BNFOLD_CHUNK) {  // every index (and index + BNFOLD_CHUNK) < 2^31
    if (s.numel == s.channels * s.inner)          // groups * rows == 1
      bnfold_rescale_range<T, bnfold_u32>(s, (bnfold_u32)begin, (bnfold_u32)end, thread, scale_d,
                                          scale_f, bnfold_channel32_rows1{s});
    else
      bnfold_rescale_range<T, bnfold_u32>(s, (bnfold_u32)begin, (bnfold_u32)end, thread, scale_d,
                                          scale_f, bnfold_channel32{s});
  } else
    bnfold_rescale_range<T, bnfold_i64>(s, begin, end, thread, scale_d, scale_f, bnfold_channel64{s});
}

// What thread `thread` of block `block` of the weight launch does: block b rescales chunk
// (b - first_block) of the segment whose first_block <= b.
BNFOLD_HD void bnfold_weight_block(const bnfold_array_seg* segs, int n_segs, bnfold_i64 block,
                                   int thread, const double* scale_d, const float* scale_f) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_array_seg& s) const { return s.first_block; } };
  // a copy, not a reference: the loop stores weights, which the compiler cannot prove do not alias
  // the table, so fields read through a reference would be loaded again for every element
  const bnfold_array_seg s = segs[bnfold_find_segment(segs, n_segs, block, K())];
  bnfold_i64 begin = (block - s.first_block) * BNFOLD_CHUNK;
  bnfold_i64 end = begin + BNFOLD_CHUNK < s.numel ? begin + BNFOLD_CHUNK : s.numel;
  if (s.dtype == BNFOLD_F16) bnfold_rescale_chunk<bnfold_u16>(s, begin, end, thread, scale_d, scale_f);
  else if (s.dtype == BNFOLD_F32) bnfold_rescale_chunk<float>(s, begin, end, thread, scale_d, scale_f);
  else bnfold_rescale_chunk<double>(s, begin, end, thread, scale_d, scale_f);
}

// ---- the overflow check: read only, before anything is written -------------------------------
// Whether rescaling elements [begin, end) of a weight segment (thread `thread` of the block taking
// every BNFOLD_BLOCK-th) turns a finite weight into inf, by the rescale's own arithmetic. A channel
// whose |scale| is at most 1 cannot, and its weights are not read.
template <typename T, typename I, typename ChannelOf>
BNFOLD_HD int bnfold_check_range(const bnfold_array_seg& s, I begin, I end, int thread,
                                 const double* scale_d, const float* scale_f, ChannelOf channel_of) {
  typedef decltype(bnfold_get((const T*)0, 0)) W;
  const T* src = (const T*)s.src;
  for (I i = begin + (I)thread; i < end; i += (I)BNFOLD_BLOCK) {
    W sc = bnfold_scale_of(W(), scale_d, scale_f, channel_of(i));
    if (!bnfold_above_one(sc)) continue;
    W w = bnfold_get(src, i);
    if (bnfold_finite(w) && bnfold_overflows(src, bnfold_mul(w, sc))) return 1;
  }
  return 0;
}

template <typename T>
BNFOLD_HD int bnfold_check_chunk(const bnfold_array_seg& s, bnfold_i64 begin, bnfold_i64 end,
                                 int thread, const double* scale_d, const float* scale_f) {
  if (s.numel <= 0x7fffffffLL - BNFOLD_CHUNK) {
    if (s.numel == s.channels * s.inner)
      return bnfold_check_range<T, bnfold_u32>(s, (bnfold_u32)begin, (bnfold_u32)end, thread,
                                               scale_d, scale_f, bnfold_channel32_rows1{s});
    return bnfold_check_range<T, bnfold_u32>(s, (bnfold_u32)begin, (bnfold_u32)end, thread,
                                             scale_d, scale_f, bnfold_channel32{s});
  }
  return bnfold_check_range<T, bnfold_i64>(s, begin, end, thread, scale_d, scale_f,
                                           bnfold_channel64{s});
}

// What thread `thread` of block `block` of the check launch does (the weight launch's blocks):
// flags[segment] is set where a weight would overflow.
BNFOLD_HD void bnfold_check_block(const bnfold_array_seg* segs, int n_segs, bnfold_i64 block,
                                  int thread, const double* scale_d, const float* scale_f,
                                  int* flags) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_array_seg& s) const { return s.first_block; } };
  int seg = bnfold_find_segment(segs, n_segs, block, K());
  const bnfold_array_seg s = segs[seg];
  bnfold_i64 begin = (block - s.first_block) * BNFOLD_CHUNK;
  bnfold_i64 end = begin + BNFOLD_CHUNK < s.numel ? begin + BNFOLD_CHUNK : s.numel;
  int bad;
  if (s.dtype == BNFOLD_F16) bad = bnfold_check_chunk<bnfold_u16>(s, begin, end, thread, scale_d, scale_f);
  else if (s.dtype == BNFOLD_F32) bad = bnfold_check_chunk<float>(s, begin, end, thread, scale_d, scale_f);
  else bad = bnfold_check_chunk<double>(s, begin, end, thread, scale_d, scale_f);
  if (bad) flags[seg] = 1;
}

// ---- BN -> layer biases: one block per output, a sum over that output's weights ------------------
// bias[o] + sum_j weight[e] * offset[channel(e)] in float64. Thread t adds the terms t, t + BLOCK, ...
// in order; the block then adds the threads' sums pairwise (bnfold_tree_step), the same order on
// the device and in the host tests.
BNFOLD_HD int bnfold_input_segment(const bnfold_input_seg* segs, int n_segs, bnfold_i64 block) {
  struct K { BNFOLD_HD bnfold_i64 operator()(const bnfold_input_seg& s) const { return s.first_block; } };
  return bnfold_find_segment(segs, n_segs, block, K());
}

BNFOLD_HD double bnfold_input_partial(const bnfold_input_seg& s, bnfold_i64 o, int thread,
                                      const double* offset) {
  double sum = 0.0;
  bnfold_i64 group = o / s.per_group;
  bnfold_i64 first = group * s.group_stride + (o - group * s.per_group) * s.out_stride;
  for (bnfold_i64 j = thread; j < s.terms; j += BNFOLD_BLOCK) {
    bnfold_i64 e = first + j * s.term_stride;
    bnfold_i64 c = s.channel_offset + bnfold_channel<bnfold_i64>(e, s.inner, s.channels, s.rows);
    sum = BNFOLD_DADD(sum, BNFOLD_DMUL(bnfold_load((const void*)s.weight, (int)s.weight_dtype, e),
                                       offset[c]));
  }
  return sum;
}

// One step of the block's pairwise sum: the first `half` threads add the next `half` sums.
BNFOLD_HD void bnfold_tree_step(double* sums, int thread, int half) {
  if (thread < half) sums[thread] = BNFOLD_DADD(sums[thread], sums[thread + half]);
}

// *flag is set where the stored bias is not finite though the layer's bias was (an overflow, or a
// weight that is not finite: the host tells which, and names it).
BNFOLD_HD void bnfold_input_store(const bnfold_input_seg& s, bnfold_i64 o, double sum, int* flag) {
  double b = s.bias ? bnfold_load((const void*)s.bias, (int)s.bias_dtype, o) : 0.0;
  double v = BNFOLD_DADD(b, sum);
  bnfold_store((void*)s.dst, (int)s.dst_dtype, o, v);
  if (!bnfold_stored_finite((int)s.dst_dtype, v) && isfinite(b)) *flag = 1;
}
