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
// and the sums are not reassociated beyond the fixed 16 lanes written below.
//
// Built by native.py with `g++ -O3 -march=native` (vectorised for the CPU it runs on).

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int LANES = 16;

inline float load(float v) { return v; }
inline float load(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
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

// out[j] = x . rows[j] for 4 rows of length k (x in float32): 4 independent sums of 16
// lanes each, so the loop is vectorised and not bound by one sum's latency.
template <typename T>
inline void dot4(const float* x, const T* r0, const T* r1, const T* r2, const T* r3, int64_t k, float* out) {
  float s0[LANES] = {}, s1[LANES] = {}, s2[LANES] = {}, s3[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= k; i += LANES) {
    for (int l = 0; l < LANES; ++l) {
      const float xv = x[i + l];
      s0[l] += xv * load(r0[i + l]);
      s1[l] += xv * load(r1[i + l]);
      s2[l] += xv * load(r2[i + l]);
      s3[l] += xv * load(r3[i + l]);
    }
  }
  float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (int l = 0; l < LANES; ++l) {
    t0 += s0[l];
    t1 += s1[l];
    t2 += s2[l];
    t3 += s3[l];
  }
  for (; i < k; ++i) {
    t0 += x[i] * load(r0[i]);
    t1 += x[i] * load(r1[i]);
    t2 += x[i] * load(r2[i]);
    t3 += x[i] * load(r3[i]);
  }
  out[0] = t0;
  out[1] = t1;
  out[2] = t2;
  out[3] = t3;
}

template <typename T>
inline float dot1(const float* x, const T* r, int64_t k) {
  float s[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= k; i += LANES)
    for (int l = 0; l < LANES; ++l) s[l] += x[i + l] * load(r[i + l]);
  float t = 0;
  for (int l = 0; l < LANES; ++l) t += s[l];
  for (; i < k; ++i) t += x[i] * load(r[i]);
  return t;
}

template <typename T>
void apply(T* y, int64_t y_stride, const T* x, int64_t x_stride, int64_t k, const T* a, int64_t rank_sum,
           const int64_t* slot_of, int64_t tokens, int64_t slices, const int64_t* sizes, const T* const* b,
           int64_t rank, int64_t live, float scale) {
  int64_t widest = 0;
  for (int64_t i = 0; i < slices; ++i) widest = sizes[i] > widest ? sizes[i] : widest;
  std::vector<float> xf(k), h(rank_sum), acc(widest);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_of[t];
    if (slot < 0) continue;
    const T* xt = x + t * x_stride;
    for (int64_t i = 0; i < k; ++i) xf[i] = load(xt[i]);
    const T* as = a + slot * rank_sum * k;
    int64_t j = 0;
    for (; j + 4 <= rank_sum; j += 4)
      dot4(xf.data(), as + j * k, as + (j + 1) * k, as + (j + 2) * k, as + (j + 3) * k, k, h.data() + j);
    for (; j < rank_sum; ++j) h[j] = dot1(xf.data(), as + j * k, k);
    T* yt = y + t * y_stride;
    int64_t offset = 0;
    for (int64_t i = 0; i < slices; ++i) {
      const int64_t size = sizes[i];
      if (live >> i & 1) {
        // the rank's rows one after the other into a float32 sum (in L1: at most a few
        // thousand columns), then added into y and rounded once
        const T* bs = b[i] + slot * rank * size;
        float* out = acc.data();
        for (int64_t n = 0; n < size; ++n) out[n] = 0.0f;
        for (int64_t r = 0; r < rank; ++r) {
          const float c = scale * h[i * rank + r];
          const T* row = bs + r * size;
          for (int64_t n = 0; n < size; ++n) out[n] += c * load(row[n]);
        }
        T* yo = yt + offset;
        for (int64_t n = 0; n < size; ++n) store(yo[n], load(yo[n]) + out[n]);
      }
      offset += size;
    }
  }
}

}  // namespace

extern "C" {

// The ABI version native.py checks (bump on any change of the signatures below).
int64_t adapterserve_lora_kernel_version() { return 1; }

void adapterserve_lora_apply_f32(float* y, int64_t y_stride, const float* x, int64_t x_stride, int64_t k,
                                 const float* a, int64_t rank_sum, const int64_t* slot_of, int64_t tokens,
                                 int64_t slices, const int64_t* sizes, const float* const* b, int64_t rank,
                                 int64_t live, float scale) {
  apply(y, y_stride, x, x_stride, k, a, rank_sum, slot_of, tokens, slices, sizes, b, rank, live, scale);
}

void adapterserve_lora_apply_bf16(uint16_t* y, int64_t y_stride, const uint16_t* x, int64_t x_stride, int64_t k,
                                  const uint16_t* a, int64_t rank_sum, const int64_t* slot_of, int64_t tokens,
                                  int64_t slices, const int64_t* sizes, const uint16_t* const* b, int64_t rank,
                                  int64_t live, float scale) {
  apply(y, y_stride, x, x_stride, k, a, rank_sum, slot_of, tokens, slices, sizes, b, rank, live, scale);
}
}
