// MatMulQ4(A, B, scales, mins) -> Y: a float matrix times 4-bit weights that carry a float16 scale AND
// a float16 minimum per block of 32 along K (GGUF's Q4_1 format):
//
//   W[n, k] = scale[n, b] * q[n, k] + min[n, b],   b = k / 32,  q in 0..15
//   Y[..., n] = sum_k A[..., k] * W[n, k]
//
// Why: com.microsoft.MatMulNBits stores an integer zero point per block, so it can't hold a Q4_1 block
// (whose minimum is any float) exactly, and its float zero points have no fast CPU path. Here a block
// costs 20 bytes per 32 weights, against MatMulNBits' 24 once ONNX Runtime has packed it (16 of codes,
// a float scale, and a float block sum). Decode at batch 1 reads every weight once per token.
//
// Layout (slimline.ops.q4.pack writes it): columns in groups of 16 (N padded up with zero
// columns), G = ceil(N / 16), nb = K / 32.
//   B       uint8   [G, nb, 256]: for group g, block b, byte c * 64 + l * 4 + t (c = 0..3, lane l = 0..15,
//                   t = 0..3) holds q[16 g + l, 32 b + 8 c + t] in its low nibble and
//                   q[16 g + l, 32 b + 8 c + 4 + t] in its high nibble;
//   scales  float16 [G, nb, 16], mins float16 [G, nb, 16]: lane l of group g is column 16 g + l.
// So a 512-bit register holds four consecutive k of 16 columns, and one int8 dot-product instruction
// (four activations broadcast) advances 16 columns by four k: no horizontal sums, and each thread reads
// its columns' weights as one sequential stream. Attributes K, N, block_size (32 only).
//
// Numerics (what slimline.ops.reference.matmul_q4 computes): each row of A is quantized per block of
// 32 to int8 (scale = max|x| / 127, codes = round-half-even(x * 127 / max|x|)), the activations ONNX
// Runtime's MatMulNBits uses at accuracy_level 4. A block adds
// scale * xscale * sum(q * xcode) + min * xscale * sum(xcode): the dequantized weights times the
// rounded activations, exactly.
//
// MatMulQ8(A, B, scales, mins) -> Y: the same with 8-bit codes (q in 0..255), W = scale * q + min, and
// B [G, nb, 512]: byte c * 64 + l * 4 + t (c = 0..7) holds q[16 g + l, 32 b + 4 c + t]. A GGUF Q8_0 block
// (int8 codes c, scale d) is q = c + 128, min = -128 d, exactly; the quantizer also fits min/max grids.
// Why: a GGUF's 8-bit tensors (SmolLM2's tied Q8_0 embedding / LM head) come back exactly, in the
// kernel and layout of the 4-bit layers. 36 bytes per 32 weights.
//
// Kernels: AVX-512 VNNI, AVX2, and portable C++, chosen once from what the CPU reports; rows of A four
// at a time (a prompt) share each unpacked block. Column groups are split over ONNX Runtime's intra-op
// threads.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SLIMLINE_X86 1
#endif

#include "slimline_ops.h"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kLanes = 16;                       // columns per group
// one block of one group: 256 bytes at 4 bits, 512 at 8
constexpr int64_t GroupBytes(int bits) { return kLanes * kBlock * bits / 8; }

float HalfToFloat(uint16_t h) { return Ort::Float16_t::FromBits(h).ToFloat(); }

// The rows of A, quantized per block of 32: int8 codes in k order, each block's scale and the sum of its rounded activations (scale * sum of codes).
struct QuantRows {
  int64_t m = 0, k = 0;
  std::vector<int8_t> codes;  // [m, k]
  std::vector<float> scale, sum;  // [m, k / 32]
  std::vector<int32_t> codesum;    // [m, k / 32]: the sum of each block's codes
};

void Quantize(const float* x, int64_t m, int64_t k, QuantRows& out) {
  const int64_t nb = k / kBlock;
  out.m = m;
  out.k = k;
  out.codes.assign(static_cast<size_t>(m * k), 0);
  out.scale.assign(static_cast<size_t>(m * nb), 0.f);
  out.sum.assign(static_cast<size_t>(m * nb), 0.f);
  out.codesum.assign(static_cast<size_t>(m * nb), 0);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * k + b * kBlock;
      float amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
      if (amax == 0.f) continue;
      const float inv = 127.f / amax;
      const float scale = amax / 127.f;
      out.scale[r * nb + b] = scale;
      int8_t* c = out.codes.data() + r * k + b * kBlock;
      int32_t codes = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        c[i] = static_cast<int8_t>(std::clamp(static_cast<int>(std::nearbyint(xb[i] * inv)), -127, 127));
        codes += c[i];
      }
      // the sum of the *rounded* activations: the block then multiplies exactly the weights
      // (scale * q + min) by the rounded activations, and the rounding's error scales with the weights
      // themselves, not with their distance from the block's minimum (up to twice as far for centred
      // weights). With the float sum of x here SmolLM2 read +2.34% perplexity; with this, +1.70%.
      out.sum[r * nb + b] = scale * static_cast<float>(codes);
      out.codesum[r * nb + b] = codes;
    }
  }
}

// Groups [g0, g1) of the columns for rows [r0, r0 + rows): y[r, 16 g + l] for every lane l < n.
using GroupsFn = void (*)(const uint8_t* w, const uint16_t* scales, const uint16_t* mins, const QuantRows& x,
                          int64_t nb, int64_t n, int64_t g0, int64_t g1, float* y);

// The codes of lane l in one block, in k order (4 or 8 bits).
template <int Bits>
void LaneCodes(const uint8_t* blk, int64_t l, int32_t* q) {
  if constexpr (Bits == 4) {
    for (int c = 0; c < 4; ++c)
      for (int t = 0; t < 4; ++t) {
        const uint8_t byte = blk[c * 64 + l * 4 + t];
        q[8 * c + t] = byte & 15;
        q[8 * c + 4 + t] = byte >> 4;
      }
  } else {
    for (int c = 0; c < 8; ++c)
      for (int t = 0; t < 4; ++t) q[4 * c + t] = blk[c * 64 + l * 4 + t];
  }
}

template <int Bits>
void GroupsPortable(const uint8_t* w, const uint16_t* scales, const uint16_t* mins, const QuantRows& x, int64_t nb,
                    int64_t n, int64_t g0, int64_t g1, float* y) {
  constexpr int64_t kGroupBytes = GroupBytes(Bits);
  for (int64_t r = 0; r < x.m; ++r) {
    const int8_t* codes = x.codes.data() + r * x.k;
    for (int64_t g = g0; g < g1; ++g) {
      float acc[kLanes] = {};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + (g * nb + b) * kGroupBytes;
        const int64_t at = (g * nb + b) * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) {
          int32_t q[kBlock], dot = 0;
          LaneCodes<Bits>(blk, l, q);
          for (int i = 0; i < kBlock; ++i) dot += q[i] * codes[b * kBlock + i];
          acc[l] += HalfToFloat(scales[at + l]) * x.scale[r * nb + b] * static_cast<float>(dot) +
                    HalfToFloat(mins[at + l]) * x.sum[r * nb + b];
        }
      }
      for (int64_t l = 0; l < kLanes && g * kLanes + l < n; ++l) y[r * n + g * kLanes + l] = acc[l];
    }
  }
}

#ifdef SLIMLINE_X86
#define SLIMLINE_AVX512 "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define SLIMLINE_AVX2 "avx2,fma,f16c"

// R rows at once over one column group: each block's codes are unpacked once for all R rows.
template <int R, int Bits>
__attribute__((target(SLIMLINE_AVX512))) inline void Avx512Group(const uint8_t* w, const uint16_t* scales,
                                                                 const uint16_t* mins, const QuantRows& x,
                                                                 int64_t nb, int64_t n, int64_t g, int64_t r0,
                                                                 float* y) {
  constexpr int64_t kGroupBytes = GroupBytes(Bits);
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R];
  #pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* blk = w + g * nb * kGroupBytes;
  const uint16_t* sg = scales + g * nb * kLanes;
  const uint16_t* mg = mins + g * nb * kLanes;
  for (int64_t b = 0; b < nb; ++b, blk += kGroupBytes) {
    __m512i lo_acc[R], hi_acc[R];  // two chains a row: the int8 multiply-adds' latency overlaps
    #pragma GCC unroll 8
    for (int i = 0; i < R; ++i) lo_acc[i] = hi_acc[i] = _mm512_setzero_si512();
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 4 * kGroupBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 4 * kGroupBytes + 128, _MM_HINT_T0);
    if constexpr (Bits == 4) {
      #pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(blk + c * 64);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        #pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          const int32_t* codes = reinterpret_cast<const int32_t*>(x.codes.data() + (r0 + i) * x.k + b * kBlock + 8 * c);
          lo_acc[i] = _mm512_dpbusd_epi32(lo_acc[i], lo, _mm512_set1_epi32(codes[0]));
          hi_acc[i] = _mm512_dpbusd_epi32(hi_acc[i], hi, _mm512_set1_epi32(codes[1]));
        }
      }
    } else {  // 8-bit codes: one register is four k of 16 columns as they are; |q * c| * 4 <= 129540
      _mm_prefetch(reinterpret_cast<const char*>(blk) + 4 * kGroupBytes + 256, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk) + 4 * kGroupBytes + 384, _MM_HINT_T0);
      #pragma GCC unroll 8
      for (int c = 0; c < 8; c += 2) {
        const __m512i v0 = _mm512_loadu_si512(blk + c * 64);
        const __m512i v1 = _mm512_loadu_si512(blk + c * 64 + 64);
        #pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          const int32_t* codes = reinterpret_cast<const int32_t*>(x.codes.data() + (r0 + i) * x.k + b * kBlock + 4 * c);
          lo_acc[i] = _mm512_dpbusd_epi32(lo_acc[i], v0, _mm512_set1_epi32(codes[0]));
          hi_acc[i] = _mm512_dpbusd_epi32(hi_acc[i], v1, _mm512_set1_epi32(codes[1]));
        }
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + b * kLanes)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mg + b * kLanes)));
    #pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * nb + b;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[i], hi_acc[i]));
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(x.scale[at])), dot, acc[i]);
      acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[at]), acc[i]);
    }
  }
  const int64_t lanes = std::min<int64_t>(kLanes, n - g * kLanes);
  const __mmask16 keep = static_cast<__mmask16>((1u << lanes) - 1);
  #pragma GCC unroll 8
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + (r0 + i) * n + g * kLanes, keep, acc[i]);
}

template <int Bits>
__attribute__((target(SLIMLINE_AVX512))) void GroupsAvx512(const uint8_t* w, const uint16_t* scales,
                                                           const uint16_t* mins, const QuantRows& x, int64_t nb,
                                                           int64_t n, int64_t g0, int64_t g1, float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t r = 0;
    for (; r + 4 <= x.m; r += 4) Avx512Group<4, Bits>(w, scales, mins, x, nb, n, g, r, y);
    for (; r < x.m; ++r) Avx512Group<1, Bits>(w, scales, mins, x, nb, n, g, r, y);
  }
}

// AVX2: the same layout as two halves of eight lanes (bytes 0-31 and 32-63 of each 64).
// Pairs of products, 16-bit: |q * c + q * c| <= 2 * 15 * 127 = 3810, so a block's eight such sums
// (four chunks, low and high nibbles) add up to at most 30480 and stay in int16 until one madd widens
// them to int32 per lane.
__attribute__((target(SLIMLINE_AVX2))) inline __m256i Pairs(__m256i q, int32_t codes) {
  return _mm256_maddubs_epi16(q, _mm256_set1_epi32(codes));
}

// 8-bit codes: u * c pairs reach 2 * 255 * 127, over int16; the kernel multiplies the signed codes
// q - 128 instead (|(q - 128) * c| pairs <= 2 * 128 * 127 = 32512) by sign tricks, widens each pair sum to
// int32 at once, and adds back 128 * the block's code sum.
__attribute__((target(SLIMLINE_AVX2))) inline __m256i SignedPairs32(__m256i u, int32_t codes) {
  const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));  // q - 128 as int8
  const __m256i a = _mm256_sign_epi8(_mm256_set1_epi32(codes), w);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), a), _mm256_set1_epi16(1));
}

template <int R, int Bits>
__attribute__((target(SLIMLINE_AVX2))) inline void Avx2Group(const uint8_t* w, const uint16_t* scales,
                                                             const uint16_t* mins, const QuantRows& x, int64_t nb,
                                                             int64_t n, int64_t g, int64_t r0, float* y) {
  constexpr int64_t kGroupBytes = GroupBytes(Bits);
  const __m256i low = _mm256_set1_epi8(15);
  __m256 acc[R][2];
  #pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const uint8_t* blk = w + g * nb * kGroupBytes;
  const uint16_t* sg = scales + g * nb * kLanes;
  const uint16_t* mg = mins + g * nb * kLanes;
  for (int64_t b = 0; b < nb; ++b, blk += kGroupBytes) {
    __m256i dots[R][2];
    #pragma GCC unroll 8
    for (int i = 0; i < R; ++i) dots[i][0] = dots[i][1] = _mm256_setzero_si256();
    if constexpr (Bits == 4) {
      #pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) {
        #pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + c * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          #pragma GCC unroll 8
          for (int i = 0; i < R; ++i) {
            const int32_t* codes = reinterpret_cast<const int32_t*>(x.codes.data() + (r0 + i) * x.k + b * kBlock + 8 * c);
            dots[i][h] = _mm256_add_epi16(dots[i][h], _mm256_add_epi16(Pairs(lo, codes[0]), Pairs(hi, codes[1])));
          }
        }
      }
      #pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
        for (int h = 0; h < 2; ++h) dots[i][h] = _mm256_madd_epi16(dots[i][h], _mm256_set1_epi16(1));
    } else {
      #pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        #pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + c * 64 + h * 32));
          #pragma GCC unroll 8
          for (int i = 0; i < R; ++i) {
            const int32_t* codes = reinterpret_cast<const int32_t*>(x.codes.data() + (r0 + i) * x.k + b * kBlock + 4 * c);
            dots[i][h] = _mm256_add_epi32(dots[i][h], SignedPairs32(v, codes[0]));
          }
        }
      }
      #pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
        for (int h = 0; h < 2; ++h)
          dots[i][h] = _mm256_add_epi32(dots[i][h], _mm256_set1_epi32(128 * x.codesum[(r0 + i) * nb + b]));
    }
    #pragma GCC unroll 8
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + b * kLanes + h * 8)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mg + b * kLanes + h * 8)));
      #pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int64_t at = (r0 + i) * nb + b;
        acc[i][h] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(x.scale[at])), _mm256_cvtepi32_ps(dots[i][h]), acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.sum[at]), acc[i][h]);
      }
    }
  }
  const int64_t lanes = std::min<int64_t>(kLanes, n - g * kLanes);
  #pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    alignas(32) float out[kLanes];
    _mm256_store_ps(out, acc[i][0]);
    _mm256_store_ps(out + 8, acc[i][1]);
    std::memcpy(y + (r0 + i) * n + g * kLanes, out, static_cast<size_t>(lanes) * sizeof(float));
  }
}

template <int Bits>
__attribute__((target(SLIMLINE_AVX2))) void GroupsAvx2(const uint8_t* w, const uint16_t* scales, const uint16_t* mins,
                                                       const QuantRows& x, int64_t nb, int64_t n, int64_t g0,
                                                       int64_t g1, float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t r = 0;
    for (; r + 4 <= x.m; r += 4) Avx2Group<4, Bits>(w, scales, mins, x, nb, n, g, r, y);
    for (; r < x.m; ++r) Avx2Group<1, Bits>(w, scales, mins, x, nb, n, g, r, y);
  }
}
#endif

// The best kernel this CPU runs; SLIMLINE_Q4_KERNEL=avx2 or portable asks for a plainer one (tests
// hold every kernel to the reference on one machine).
template <int Bits>
GroupsFn PickKernel(const char** name) {
  const char* asked = std::getenv("SLIMLINE_Q4_KERNEL");
  const std::string want = asked ? asked : "";
#ifdef SLIMLINE_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    want != "portable";
  if (avx2 && want != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    *name = "avx512vnni";
    return GroupsAvx512<Bits>;
  }
  if (avx2) {
    *name = "avx2";
    return GroupsAvx2<Bits>;
  }
#endif
  *name = "portable";
  return GroupsPortable<Bits>;
}

struct Task {
  GroupsFn groups;
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* mins;
  const QuantRows* x;
  int64_t nb, n, groups_count, tile;
  float* y;
};

void RunTile(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t g0 = static_cast<int64_t>(index) * t.tile;
  t.groups(t.w, t.scales, t.mins, *t.x, t.nb, t.n, g0, std::min(t.groups_count, g0 + t.tile), t.y);
}

OrtStatusPtr Fail(const OrtApi& api, const std::string& msg, const char* op = "MatMulQ4") {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("slimline " + std::string(op) + ": " + msg).c_str());
}

// The attributes both ops carry: K, N and block_size (32).
OrtStatusPtr ReadShape(const OrtApi& api, const OrtKernelInfo* info, const char* op, int64_t* k, int64_t* n) {
  int64_t block = 0;
  for (auto [name, value] : {std::pair{"K", k}, std::pair{"N", n}, std::pair{"block_size", &block}}) {
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, value)) {
      api.ReleaseStatus(st);
      return Fail(api, std::string("missing attribute ") + name, op);
    }
  }
  if (block != kBlock || *k <= 0 || *k % kBlock || *n <= 0)
    return Fail(api, "block_size must be 32, K a positive multiple of 32 and N positive", op);
  return nullptr;
}

// Whether B, scales and mins hold MatMulQ4's (MatMulQ8's) packed layout for K x N.
bool PackedFits(const Ort::ConstValue& b, const Ort::ConstValue& scales, const Ort::ConstValue& mins, int64_t k, int64_t n,
                int bits) {
  const size_t blocks = static_cast<size_t>((n + kLanes - 1) / kLanes * (k / kBlock));
  return b.GetTensorTypeAndShapeInfo().GetElementCount() == blocks * static_cast<size_t>(GroupBytes(bits)) &&
         scales.GetTensorTypeAndShapeInfo().GetElementCount() == blocks * kLanes &&
         mins.GetTensorTypeAndShapeInfo().GetElementCount() == blocks * kLanes;
}

struct MatMulQ4Kernel {
  const OrtApi& api;
  int64_t k, n;
  GroupsFn groups;
  int bits;
  const char* op;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      auto a = ctx.GetInput(0);
      auto b = ctx.GetInput(1);
      auto scales = ctx.GetInput(2);
      auto mins = ctx.GetInput(3);
      std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty() || shape.back() != k) return Fail(api, "A's last dimension must be K=" + std::to_string(k), op);
      const int64_t nb = k / kBlock;
      const int64_t count = (n + kLanes - 1) / kLanes;
      if (!PackedFits(b, scales, mins, k, n, bits))
        return Fail(api, "B, scales and mins must hold ceil(N/16) * K/32 * " + std::to_string(GroupBytes(bits)) +
                             " bytes and * 16 values (slimline.ops.q4.pack's layout)", op);
      const int64_t m = static_cast<int64_t>(a.GetTensorTypeAndShapeInfo().GetElementCount()) / k;
      std::vector<int64_t> out_shape = shape;
      out_shape.back() = n;
      auto y = ctx.GetOutput(0, out_shape);
      if (m == 0) return nullptr;
      thread_local QuantRows rows;  // reused: no allocation per run once warm
      Quantize(a.GetTensorData<float>(), m, k, rows);
      // enough tiles for the threads to balance; a tile of a few groups keeps each stream long
      const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(8, count / 16));
      Task task{groups,
                b.GetTensorData<uint8_t>(),
                reinterpret_cast<const uint16_t*>(scales.GetTensorRawData()),
                reinterpret_cast<const uint16_t*>(mins.GetTensorRawData()),
                &rows,
                nb,
                n,
                count,
                tile,
                y.GetTensorMutableData<float>()};
      ctx.ParallelFor(RunTile, static_cast<size_t>((count + tile - 1) / tile), 0, &task);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Fail(api, e.what(), op);
    }
  }
};

// MatMulQ4 (bits 4) and MatMulQ8 (bits 8): one kernel, the codes' width a template parameter.
struct MatMulQ4Op : Ort::CustomOpBase<MatMulQ4Op, MatMulQ4Kernel, true> {
  explicit MatMulQ4Op(int bits) : bits_(bits) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    int64_t k = 0, n = 0;
    if (OrtStatusPtr st = ReadShape(api, info, GetName(), &k, &n)) return st;
    const char* name = nullptr;
    *kernel = new MatMulQ4Kernel{api, k, n, bits_ == 8 ? PickKernel<8>(&name) : PickKernel<4>(&name), bits_, GetName()};
    return nullptr;
  }
  const char* GetName() const { return bits_ == 8 ? "MatMulQ8" : "MatMulQ4"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                  : (i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  int bits_;
};

// GatherQ4(B, scales, mins, indices) -> Y [indices..., K]: rows of a table held in MatMulQ4's layout,
// dequantized (row r is the weight's column r: scale * q + min). A tied LM head's weights serve as the
// token-embedding table, so the model stores and maps one table. Attributes K, N (rows), block_size.
struct GatherQ4Kernel {
  const OrtApi& api;
  int64_t k, n;
  int bits;
  const char* op;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      auto b = ctx.GetInput(0);
      auto scales = ctx.GetInput(1);
      auto mins = ctx.GetInput(2);
      auto indices = ctx.GetInput(3);
      const int64_t nb = k / kBlock;
      if (!PackedFits(b, scales, mins, k, n, bits))
        return Fail(api, "the table must be the packed B, scales and mins of a MatMulQ" + std::to_string(bits) + " for K and N", op);
      auto info = indices.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = info.GetShape();
      const size_t rows = info.GetElementCount();
      shape.push_back(k);
      auto y = ctx.GetOutput(0, shape);
      float* out = y.GetTensorMutableData<float>();
      const uint8_t* w = b.GetTensorData<uint8_t>();
      const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.GetTensorRawData());
      const uint16_t* m = reinterpret_cast<const uint16_t*>(mins.GetTensorRawData());
      const bool wide = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      for (size_t i = 0; i < rows; ++i) {
        int64_t r = wide ? indices.GetTensorData<int64_t>()[i] : indices.GetTensorData<int32_t>()[i];
        if (r < 0) r += n;  // Gather's negative indices count from the end
        if (r < 0 || r >= n)
          return Fail(api, "index " + std::to_string(r) + " out of range for " + std::to_string(n) + " rows", op);
        const int64_t g = r / kLanes, l = r % kLanes;
        float* row = out + i * k;
        for (int64_t blk = 0; blk < nb; ++blk) {
          const uint8_t* bytes = w + (g * nb + blk) * GroupBytes(bits);
          const float scale = HalfToFloat(s[(g * nb + blk) * kLanes + l]);
          const float low = HalfToFloat(m[(g * nb + blk) * kLanes + l]);
          int32_t q[kBlock];
          if (bits == 8)
            LaneCodes<8>(bytes, l, q);
          else
            LaneCodes<4>(bytes, l, q);
          for (int i = 0; i < kBlock; ++i) row[blk * kBlock + i] = scale * static_cast<float>(q[i]) + low;
        }
      }
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Fail(api, e.what(), op);
    }
  }
};

// GatherQ4 / GatherQ8: rows of a MatMulQ4 / MatMulQ8 table.
struct GatherQ4Op : Ort::CustomOpBase<GatherQ4Op, GatherQ4Kernel, true> {
  GatherQ4Op(ONNXTensorElementDataType index, int bits) : index_(index), bits_(bits) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    int64_t k = 0, n = 0;
    if (OrtStatusPtr st = ReadShape(api, info, GetName(), &k, &n)) return st;
    *kernel = new GatherQ4Kernel{api, k, n, bits_, GetName()};
    return nullptr;
  }
  const char* GetName() const { return bits_ == 8 ? "GatherQ8" : "GatherQ4"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    return i == 3 ? index_ : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  ONNXTensorElementDataType index_;
  int bits_;
};

}  // namespace

std::vector<OrtCustomOp*> slimline_q4_ops() {
  static MatMulQ4Op q4(4), q8(8);
  static GatherQ4Op wide4(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 4), narrow4(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4);
  static GatherQ4Op wide8(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8), narrow8(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 8);
  return {&q4, &q8, &wide4, &narrow4, &wide8, &narrow8};
}

const char* slimline_matmul_q4_kernel() {
  const char* name = nullptr;
  PickKernel<4>(&name);
  return name;
}
