// One LoRA linear layer applied token by token, for decode-sized batches on the CPU.
//
// y[t, slice i] += scale * (x[t] . A_i[slot(t)]^T) . B_i[slot(t)]^T for every token t
// whose slot is not -1, on the fused slot layout of layout.py:
//   a:    [slots * rank_sum, k], row slot * rank_sum + i * rank + r (every slice's A of a slot)
//   b[i]: [slots * rank, size_i], row slot * rank + r (slice i's B, stored transposed)
// x, y, a and b share one element type: float32, or bfloat16 (as uint16_t bits).
//
// Why by hand: at decode sizes (16 tokens, rank 8) each PyTorch op costs more than its
// arithmetic, bf16 ones most (~20 us for a bf16 matmul of 16 x 576 by 576 x 24 against
// ~3 us in float32), and a layer takes ~6 of them. Here a layer is one call. The shrink
// and the expand accumulate in float32, the result is added into y and rounded once
// (to nearest even, as PyTorch rounds to bf16).
//
// Each token reads only its own slot and writes only its own row: a slot holding NaN or
// inf changes nothing outside the tokens that use it. No -ffast-math: NaN must stay NaN
// and the sums are grouped only as written below (16 lanes; the bf16 form: pairs of k in 16
// lanes, then a tree).
//
// Where the CPU has AVX512-BF16, bf16 goes through `apply_tokens_bf16` (`vdpbf16ps`, 32 values
// at a time, units of 4 tokens): 2-2.5x less time than the generic form (bench/RESULTS.md).
//
// Built by native.py with `g++ -O3 -march=native -fopenmp` (vectorised for the CPU it runs on;
// without OpenMP the pragmas are ignored and one thread applies the layer).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ADAPTERSERVE_BF16_INSTRUCTIONS 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// 16 floats: one AVX512 register, two AVX2 ones (GCC's vector extensions lower them to
// what -march=native has), so one source serves both CPU kinds.
constexpr int LANES = 16;
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));

inline float load(float v) { return v; }
inline float load(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadv(const uint16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  vu32 bits = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline void store(float& out, float v) { out = v; }
inline void store(uint16_t& out, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    out = uint16_t((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  out = uint16_t(bits >> 16);
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void storev(uint16_t* p, vf v) {  // the same rounding as `store`, 16 at a time
  vu32 bits;
  std::memcpy(&bits, &v, sizeof bits);
  vu32 nan = (vu32)((bits & 0x7fffffffu) > 0x7f800000u);
  vu32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  vu32 quiet = (bits >> 16) | 0x40u;
  vu16 h = __builtin_convertvector((nan & quiet) | (~nan & rounded), vu16);
  std::memcpy(p, &h, sizeof h);
}

inline float sum(vf v) {
  float t = 0;
  for (int l = 0; l < LANES; ++l) t += v[l];
  return t;
}

// h[m][j] = x[m] . rows[j] for M tokens of one slot and 4 rows of length k (x in float32):
// 4 x M independent sums, so the loop is bound by loads and FMAs, not by one sum's
// latency, and each row is loaded (and converted) once for the M tokens.
template <int M, typename T>
inline void dot4(const float* const* x, const T* const* rows, int64_t k, float* const* h, int64_t j) {
  vf s[M][4] = {};
  int64_t i = 0;
  for (; i + LANES <= k; i += LANES) {
    vf r[4];
    for (int q = 0; q < 4; ++q) r[q] = loadv(rows[q] + i);
    for (int m = 0; m < M; ++m) {
      const vf xv = loadv(x[m] + i);
      for (int q = 0; q < 4; ++q) s[m][q] += xv * r[q];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < 4; ++q) {
      float t = sum(s[m][q]);
      for (int64_t e = i; e < k; ++e) t += x[m][e] * load(rows[q][e]);
      h[m][j + q] = t;
    }
}

template <int M, typename T>
inline void dot1(const float* const* x, const T* row, int64_t k, float* const* h, int64_t j) {
  for (int m = 0; m < M; ++m) {
    vf s = {};
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES) s += loadv(x[m] + i) * loadv(row + i);
    float t = sum(s);
    for (; i < k; ++i) t += x[m][i] * load(row[i]);
    h[m][j] = t;
  }
}

// The expand of one slice's columns n .. size, one column at a time (what the vector loops
// leave): the same sums, added into y and rounded once, as theirs.
template <int M, typename T>
inline void expand_columns(const int64_t* t, T* y, int64_t y_stride, int64_t offset, const T* bs, int64_t size,
                           int64_t rank, float* const* c, int64_t n) {
  for (; n < size; ++n)
    for (int m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t r = 0; r < rank; ++r) acc += c[m][r] * load(bs[r * size + n]);
      T& yo = y[t[m] * y_stride + offset + n];
      store(yo, load(yo) + acc);
    }
}

// The tokens `t[0..M)`, all in `slot`: shrink, then expand each live slice into y.
template <int M, typename T>
inline void apply_tokens(const int64_t* t, int64_t slot, T* y, int64_t y_stride, const T* x, int64_t x_stride, int64_t k,
                         const T* a, int64_t rank_sum, int64_t slices, const int64_t* sizes, const T* const* b,
                         int64_t rank, int64_t live, float scale, float* work) {
  float* xf[M];
  float* h[M];
  float* c[M];
  for (int m = 0; m < M; ++m) {
    xf[m] = work + m * (k + 2 * rank_sum);
    h[m] = xf[m] + k;
    c[m] = h[m] + rank_sum;
    const T* xt = x + t[m] * x_stride;
    for (int64_t i = 0; i < k; ++i) xf[m][i] = load(xt[i]);
  }
  // The shrink rows of live slices only: an adapter trained on q and v leaves k's rows of
  // a fused qkv layer unused (a third of its shrink). Each row's sum is computed alone, so
  // the rows skipped change no bit of the others. (Every slice has the same rank:
  // rank_sum == slices * rank, `layout.fused_slots`.)
  const T* as = a + slot * rank_sum * k;
  for (int64_t i = 0; i < slices; ++i) {
    if (!(live >> i & 1)) continue;
    int64_t j = i * rank;
    const int64_t end = j + rank;
    for (; j + 4 <= end; j += 4) {
      const T* rows[4] = {as + j * k, as + (j + 1) * k, as + (j + 2) * k, as + (j + 3) * k};
      dot4<M>(xf, rows, k, h, j);
    }
    for (; j < end; ++j) dot1<M>(xf, as + j * k, k, h, j);
  }
  int64_t offset = 0;
  for (int64_t i = 0; i < slices; ++i) {
    const int64_t size = sizes[i];
    if (live >> i & 1) {
      // 16 columns at a time: each rank's row of B read once for the M tokens, the sums
      // kept in registers, added into y and rounded once
      const T* bs = b[i] + slot * rank * size;
      for (int m = 0; m < M; ++m)
        for (int64_t r = 0; r < rank; ++r) c[m][r] = scale * h[m][i * rank + r];
      int64_t n = 0;
      for (; n + LANES <= size; n += LANES) {
        vf acc[M] = {};
        for (int64_t r = 0; r < rank; ++r) {
          const vf row = loadv(bs + r * size + n);
          for (int m = 0; m < M; ++m) acc[m] += c[m][r] * row;
        }
        for (int m = 0; m < M; ++m) {
          T* yo = y + t[m] * y_stride + offset + n;
          storev(yo, loadv(yo) + acc[m]);
        }
      }
      expand_columns<M>(t, y, y_stride, offset, bs, size, rank, c, n);
    }
    offset += size;
  }
}

#ifdef ADAPTERSERVE_BF16_INSTRUCTIONS
// bf16 on CPUs with AVX512-BF16 (what `dtype auto` serves bf16 on): the same work as
// `apply_tokens`, written for the instructions these CPUs have.
// - The shrink multiplies bf16 pairs with `vdpbf16ps`: each product of two bf16 values is
//   exact in float32 and the sums are float32, as above, only grouped by pairs of k (and
//   the lanes summed as a tree); no conversion of x or of A.
// - The expand converts 32 bf16 of B (and of y) at once by interleaving them with zeros
//   (`vpunpck[lh]wd`: float32 in an order permuted within 128-bit lanes, the same for B and
//   y) and packs the rounded sums back (`vpackusdw` undoes that order): the same operations
//   in the same order as `apply_tokens`, so the same bits.
inline __m512i rounded_bf16_bits(__m512 v) {  // `store`'s rounding, 16 lanes, in the low half of each
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __m512i quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet);
}

// h[m][j + q] = x[m] . A row (j + q), q < Q, for M tokens: bf16 pairs multiplied and summed
// in float32 (`vdpbf16ps`), Q x M independent sums, each row loaded once for the M tokens.
template <int M, int Q>
inline void dot_bf16(const uint16_t* const* x, const uint16_t* rows, int64_t k, float* const* h, int64_t j) {
  __m512 s[M][Q];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < Q; ++q) s[m][q] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 32 <= k; p += 32) {
    __m512bh r[Q];
    for (int q = 0; q < Q; ++q) r[q] = (__m512bh)_mm512_loadu_si512(rows + q * k + p);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[m] + p);
      for (int q = 0; q < Q; ++q) s[m][q] = _mm512_dpbf16_ps(s[m][q], xv, r[q]);
    }
  }
  if (p < k) {  // the last k % 32: the lanes beyond k load as zeros
    const __mmask32 tail = _cvtu32_mask32((1u << (k - p)) - 1u);
    __m512bh r[Q];
    for (int q = 0; q < Q; ++q) r[q] = (__m512bh)_mm512_maskz_loadu_epi16(tail, rows + q * k + p);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x[m] + p);
      for (int q = 0; q < Q; ++q) s[m][q] = _mm512_dpbf16_ps(s[m][q], xv, r[q]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < Q; ++q) h[m][j + q] = _mm512_reduce_add_ps(s[m][q]);
}

// y[0..32) += the 32 sums `lo` (then `hi`), in the order the unpacks give B's and y's values;
// rounded to bf16 once, as `store` rounds.
inline void add_rounded_bf16(uint16_t* yo, __m512 lo, __m512 hi) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i yv = _mm512_loadu_si512(yo);
  const __m512 ylo = _mm512_add_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, yv)), lo);
  const __m512 yhi = _mm512_add_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, yv)), hi);
  _mm512_storeu_si512(yo, _mm512_packus_epi32(rounded_bf16_bits(ylo), rounded_bf16_bits(yhi)));
}

// The expand of one slice for units of 1 or 2 tokens (a decode step over many adapters).
// The column-block order below (the 4-token units') reads all rank rows of B a cache line
// at a time: 8 short interleaved streams, whose loads stalled when B came from memory.
// Here B's rows are read 4 at a time from start to end (4 long streams over the slot's B,
// one block of memory), the float32 sums kept in `acc` (M x size, in L1) between the
// groups of rows. Each column's sum is the same sum in the same order (rank 0 first, from
// zero), added into y and rounded once: the same bits.
template <int M>
inline void expand_by_rows_bf16(const int64_t* t, uint16_t* y, int64_t y_stride, int64_t offset, const uint16_t* bs,
                                int64_t size, int64_t rank, float* const* c, float* acc) {
  constexpr int64_t ROWS = 4;
  const __m512i zero = _mm512_setzero_si512();
  const int64_t vec = size / 32 * 32;
  for (int64_t r0 = 0; r0 < rank; r0 += ROWS) {
    const int64_t rows = std::min(ROWS, rank - r0);
    __m512 cm[ROWS][M];
    for (int64_t q = 0; q < rows; ++q)
      for (int m = 0; m < M; ++m) cm[q][m] = _mm512_set1_ps(c[m][r0 + q]);
    for (int64_t n = 0; n < vec; n += 32) {
      __m512 lo[M], hi[M];  // lo's 16 sums, then hi's, at acc + m * size + n
      for (int m = 0; m < M; ++m) {
        lo[m] = r0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * size + n);
        hi[m] = r0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * size + n + 16);
      }
      for (int64_t q = 0; q < rows; ++q) {
        const __m512i v = _mm512_loadu_si512(bs + (r0 + q) * size + n);
        const __m512 vlo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
        const __m512 vhi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
        for (int m = 0; m < M; ++m) {
          lo[m] = _mm512_fmadd_ps(cm[q][m], vlo, lo[m]);
          hi[m] = _mm512_fmadd_ps(cm[q][m], vhi, hi[m]);
        }
      }
      for (int m = 0; m < M; ++m) {
        _mm512_storeu_ps(acc + m * size + n, lo[m]);
        _mm512_storeu_ps(acc + m * size + n + 16, hi[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int64_t n = 0; n < vec; n += 32) {
      add_rounded_bf16(y + t[m] * y_stride + offset + n, _mm512_loadu_ps(acc + m * size + n),
                       _mm512_loadu_ps(acc + m * size + n + 16));
    }
  expand_columns<M>(t, y, y_stride, offset, bs, size, rank, c, vec);
}

template <int M>
inline void apply_tokens_bf16(const int64_t* t, int64_t slot, uint16_t* y, int64_t y_stride, const uint16_t* x,
                              int64_t x_stride, int64_t k, const uint16_t* a, int64_t rank_sum, int64_t slices,
                              const int64_t* sizes, const uint16_t* const* b, int64_t rank, int64_t live, float scale,
                              float* work) {
  float* h[M];
  float* c[M];
  const uint16_t* xt[M];
  for (int m = 0; m < M; ++m) {
    h[m] = work + m * 2 * rank_sum;
    c[m] = h[m] + rank_sum;
    xt[m] = x + t[m] * x_stride;
  }
  const uint16_t* as = a + slot * rank_sum * k;  // live slices only, as in `apply_tokens`
  for (int64_t i = 0; i < slices; ++i) {
    if (!(live >> i & 1)) continue;
    int64_t j = i * rank;
    for (; j + 4 <= (i + 1) * rank; j += 4) dot_bf16<M, 4>(xt, as + j * k, k, h, j);
    for (; j < (i + 1) * rank; ++j) dot_bf16<M, 1>(xt, as + j * k, k, h, j);
  }
  const __m512i zero = _mm512_setzero_si512();
  int64_t offset = 0;
  for (int64_t i = 0; i < slices; ++i) {
    const int64_t size = sizes[i];
    if (live >> i & 1) {
      const uint16_t* bs = b[i] + slot * rank * size;
      for (int m = 0; m < M; ++m)
        for (int64_t r = 0; r < rank; ++r) c[m][r] = scale * h[m][i * rank + r];
      if constexpr (M <= 2) {
        expand_by_rows_bf16<M>(t, y, y_stride, offset, bs, size, rank, c, work + M * 2 * rank_sum);
        offset += size;
        continue;
      }
      int64_t n = 0;
      for (; n + 32 <= size; n += 32) {
        __m512 lo[M], hi[M];
        for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
        for (int64_t r = 0; r < rank; ++r) {
          const __m512i v = _mm512_loadu_si512(bs + r * size + n);
          const __m512 vlo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
          const __m512 vhi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
          for (int m = 0; m < M; ++m) {
            const __m512 cm = _mm512_set1_ps(c[m][r]);
            lo[m] = _mm512_fmadd_ps(cm, vlo, lo[m]);
            hi[m] = _mm512_fmadd_ps(cm, vhi, hi[m]);
          }
        }
        for (int m = 0; m < M; ++m) add_rounded_bf16(y + t[m] * y_stride + offset + n, lo[m], hi[m]);
      }
      expand_columns<M>(t, y, y_stride, offset, bs, size, rank, c, n);
    }
    offset += size;
  }
}
#endif

// Tokens of one slot taken together, so that each row of A and B is read once for them:
// up to 4 in the bf16 form (4 against 2: 10-25% less time per layer, bench/RESULTS.md),
// 2 in the generic one (4 measured no faster; on AVX2 its sums would not fit the registers).
template <typename T>
constexpr int max_unit() {
#ifdef ADAPTERSERVE_BF16_INSTRUCTIONS
  if (sizeof(T) == 2) return 4;
#endif
  return 2;
}

// The tokens of one unit: `apply_tokens`, or its bf16 form where the CPU has AVX512-BF16.
template <int M, typename T>
inline void apply_unit(const int64_t* t, int64_t slot, T* y, int64_t y_stride, const T* x, int64_t x_stride, int64_t k,
                       const T* a, int64_t rank_sum, int64_t slices, const int64_t* sizes, const T* const* b,
                       int64_t rank, int64_t live, float scale, float* work) {
#ifdef ADAPTERSERVE_BF16_INSTRUCTIONS
  if constexpr (sizeof(T) == 2)
    apply_tokens_bf16<M>(t, slot, y, y_stride, x, x_stride, k, a, rank_sum, slices, sizes, b, rank, live, scale, work);
  else
#endif
    apply_tokens<M>(t, slot, y, y_stride, x, x_stride, k, a, rank_sum, slices, sizes, b, rank, live, scale, work);
}

// Ask for a slot's rows of A and B of the live slices (towards L2) before they are needed:
// the next unit's, while this one computes. Its rows are short streams (a B row of a k or
// v slice is 384 bytes), too short for the hardware's prefetchers to start on their own.
template <typename T>
inline void prefetch_slot(int64_t slot, int64_t k, const T* a, int64_t rank_sum, int64_t slices, const int64_t* sizes,
                          const T* const* b, int64_t rank, int64_t live) {
  constexpr int64_t LINE = 64 / sizeof(T);  // elements per cache line
  const T* as = a + slot * rank_sum * k;
  for (int64_t i = 0; i < slices; ++i) {
    if (!(live >> i & 1)) continue;
    const T* rows = as + i * rank * k;
    for (int64_t e = 0; e < rank * k; e += LINE) __builtin_prefetch(rows + e, 0, 2);
    const T* bs = b[i] + slot * rank * sizes[i];
    for (int64_t e = 0; e < rank * sizes[i]; e += LINE) __builtin_prefetch(bs + e, 0, 2);
  }
}

template <typename T>
void apply(T* y, int64_t y_stride, const T* x, int64_t x_stride, int64_t k, const T* a, int64_t rank_sum,
           const int64_t* slot_of, int64_t tokens, int64_t slices, const int64_t* sizes, const T* const* b,
           int64_t rank, int64_t live, float scale, int64_t threads) {
  // The buffers below are each thread's own and kept between calls (cleared, never freed):
  // allocating and zeroing them in each of a step's ~120 calls took ~15% of what one
  // adapter adds to the engine's main thread (malloc, memset; perf, bench/RESULTS.md).
  // the tokens with an adapter, by slot (stable), so that tokens of one slot go together
  static thread_local std::vector<int64_t> order_of_thread;
  std::vector<int64_t>& order = order_of_thread;  // a local name: the parallel region below shares this thread's
  order.clear();
  for (int64_t t = 0; t < tokens; ++t)
    if (slot_of[t] >= 0) order.push_back(t);
  const auto by_slot = [&](int64_t p, int64_t q) { return slot_of[p] < slot_of[q]; };
  if (order.size() <= 64) {  // a decode step: an insertion sort (stable), without stable_sort's buffer
    for (size_t i = 1; i < order.size(); ++i)
      for (size_t j = i; j > 0 && by_slot(order[j], order[j - 1]); --j) std::swap(order[j], order[j - 1]);
  } else {
    std::stable_sort(order.begin(), order.end(), by_slot);
  }
  // the units of work: 4 (bf16 form), 2 or 1 tokens of one slot; each writes only its own rows of y
  constexpr int UNIT = max_unit<T>();
  static thread_local std::vector<int64_t> unit_start_of_thread;
  std::vector<int64_t>& unit_start = unit_start_of_thread;
  unit_start.clear();
  for (size_t p = 0; p < order.size();) {
    unit_start.push_back(int64_t(p));
    int same = 1;
    while (same < UNIT && p + same < order.size() && slot_of[order[p + same]] == slot_of[order[p]]) ++same;
    p += same >= 4 ? 4 : same >= 2 ? 2 : 1;
  }
  const int64_t units = int64_t(unit_start.size());
  unit_start.push_back(int64_t(order.size()));
  int64_t widest = 0;  // the widest live slice: the row-order expand's sums (expand_by_rows_bf16)
  for (int64_t i = 0; i < slices; ++i)
    if (live >> i & 1) widest = std::max(widest, sizes[i]);
  const size_t work_size = UNIT * (k + 2 * rank_sum + widest);
  // The units split over the threads of the OpenMP runtime PyTorch runs on (libgomp.so.1,
  // already loaded: the loader shares it, so these are the threads vLLM bound to the
  // cores), in contiguous ranges: the units of one slot mostly stay on one core's cache.
  // One unit runs on the calling thread alone. `threads` 0: as many as PyTorch runs.
#ifdef _OPENMP
  const int team = threads > 0 ? int(threads) : omp_get_max_threads();
#else
  const int team = 1;
#endif
#pragma omp parallel if (units > 1 && team > 1) num_threads(team)
  {
    // every value of `work` a unit reads it has written first (apply_tokens*): not zeroed
    static thread_local std::vector<float> work;
    if (work.size() < work_size) work.resize(work_size);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t p = unit_start[u];
      const int64_t slot = slot_of[order[p]];
      const int64_t size = unit_start[u + 1] - p;
      if (u + 1 < units && slot_of[order[unit_start[u + 1]]] != slot)
        prefetch_slot(slot_of[order[unit_start[u + 1]]], k, a, rank_sum, slices, sizes, b, rank, live);
      if constexpr (UNIT == 4) {
        if (size == 4) {
          apply_unit<4>(&order[p], slot, y, y_stride, x, x_stride, k, a, rank_sum, slices, sizes, b, rank, live, scale, work.data());
          continue;
        }
      }
      if (size == 2)
        apply_unit<2>(&order[p], slot, y, y_stride, x, x_stride, k, a, rank_sum, slices, sizes, b, rank, live, scale, work.data());
      else
        apply_unit<1>(&order[p], slot, y, y_stride, x, x_stride, k, a, rank_sum, slices, sizes, b, rank, live, scale, work.data());
    }
  }
}

}  // namespace

extern "C" {

// The ABI version native.py checks (bump on any change of the functions below).
int64_t adapterserve_lora_kernel_version() { return 3; }

// 1 where bf16 goes through `apply_tokens_bf16` (the CPU has AVX512-BF16): the form the
// plan then gives every bf16 batch (punica.py, `KERNEL_EVERY_SIZE_WITH_BF16_FORM`).
int64_t adapterserve_lora_kernel_bf16_form() {
#ifdef ADAPTERSERVE_BF16_INSTRUCTIONS
  return 1;
#else
  return 0;
#endif
}

void adapterserve_lora_apply_f32(float* y, int64_t y_stride, const float* x, int64_t x_stride, int64_t k,
                                 const float* a, int64_t rank_sum, const int64_t* slot_of, int64_t tokens,
                                 int64_t slices, const int64_t* sizes, const float* const* b, int64_t rank,
                                 int64_t live, float scale, int64_t threads) {
  apply(y, y_stride, x, x_stride, k, a, rank_sum, slot_of, tokens, slices, sizes, b, rank, live, scale, threads);
}

void adapterserve_lora_apply_bf16(uint16_t* y, int64_t y_stride, const uint16_t* x, int64_t x_stride, int64_t k,
                                  const uint16_t* a, int64_t rank_sum, const int64_t* slot_of, int64_t tokens,
                                  int64_t slices, const int64_t* sizes, const uint16_t* const* b, int64_t rank,
                                  int64_t live, float scale, int64_t threads) {
  apply(y, y_stride, x, x_stride, k, a, rank_sum, slot_of, tokens, slices, sizes, b, rank, live, scale, threads);
}
}
