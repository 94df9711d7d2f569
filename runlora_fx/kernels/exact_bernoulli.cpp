// Tensor.bernoulli_(p) for a float p on a contiguous CPU tensor, drawn as ATen's serial CPU kernel draws it (the same
// values, the same generator state after), in bulk. See exact_bernoulli.py for why and for when it is used.
//
// What it reproduces (ATen's scalar bernoulli kernel when it does not go through MKL): per element, in order, one
// 64-bit draw from the CPUGeneratorImpl's mt19937, (first 32-bit output << 32) | second, whose low 53 bits k give
// u = k / 2^53, and the element is 1 when u < p. Since k is an integer and k / 2^53 is exact, u < p is k < ceil(p 2^53).
// The engine's 32-bit outputs are the standard mt19937 ones: every 624 outputs the state block is regenerated in place
// ("twist"), and each output is a state word tempered. The engine's bookkeeping (left_, next_) is advanced exactly as
// its operator() would advance it, so the generator is left where bernoulli_ leaves it; the cached normal samples of
// the generator are not touched (bernoulli_ does not touch them either).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

namespace {

constexpr int kN = at::MERSENNE_STATE_N;
constexpr int kM = at::MERSENNE_STATE_M;
constexpr int64_t kChunk = 2048;  // elements per pass: 16 KiB of 32-bit words, kept in L1

inline uint32_t twisted(uint32_t upper_from, uint32_t lower_from) {
  uint32_t y = (upper_from & at::UMASK) | (lower_from & at::LMASK);
  return (y >> 1) ^ ((lower_from & 1u) ? at::MATRIX_A : 0u);
}

// The next 624-word state block, in place (word i from words i, i + 1 and i + 397 mod 624; the last from the new
// word 0). The two loops only read words they have not yet written, or wrote at least 227 words earlier.
HOT void twist(uint32_t* s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twisted(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twisted(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twisted(s[kN - 1], s[0]);
}

HOT void temper(const uint32_t* s, uint32_t* out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    uint32_t y = s[i];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    out[i] = y;
  }
}

// The next `count` 32-bit outputs of the engine whose pod is `d`, advancing `d` as `count` calls would.
// A call decrements left_; when that reaches 0 the block is twisted (left_ = 624, next_ = 0) before the read.
// Here a twist sets left_ = 625, so that the call that twisted is counted like the others.
void outputs(at::mt19937_data_pod& d, uint32_t* out, int64_t count) {
  while (count > 0) {
    int64_t take = std::min<int64_t>(count, d.left_ - 1);
    if (take > 0) {
      temper(d.state_.data() + d.next_, out, take);
      out += take;
      count -= take;
      d.next_ += static_cast<uint32_t>(take);
      d.left_ -= static_cast<int>(take);
    }
    if (count > 0) {
      twist(d.state_.data());
      d.left_ = kN + 1;
      d.next_ = 0;
    }
  }
}

// out[i] = `one` (the bits of 1 in the output dtype) when the low 53 bits of (w[2i] << 32 | w[2i+1]) are below
// `threshold`, else 0 (all zero bits in every output dtype). The pair is read as one little-endian 64-bit word
// (w[2i] in its low half) so that the loop is lane-wise; one copy of it per output width, each vectorized.
template <typename U>
__attribute__((always_inline)) inline void compare(const uint32_t* w, int64_t n, int64_t threshold, U one, U* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint64_t v;
    std::memcpy(&v, w + 2 * i, sizeof v);
    int64_t k = static_cast<int64_t>(((v & 0x1fffffu) << 32) | (v >> 32));
    out[i] = k < threshold ? one : U(0);
  }
}

HOT void compare8(const uint32_t* w, int64_t n, int64_t t, uint8_t* out) { compare<uint8_t>(w, n, t, 1, out); }
HOT void compare16(const uint32_t* w, int64_t n, int64_t t, uint16_t one, uint16_t* out) { compare(w, n, t, one, out); }
HOT void compare32(const uint32_t* w, int64_t n, int64_t t, uint32_t* out) { compare(w, n, t, 0x3f800000u, out); }
HOT void compare64(const uint32_t* w, int64_t n, int64_t t, uint64_t* out) {
  compare<uint64_t>(w, n, t, 0x3ff0000000000000u, out);
}

bool dtype_supported(at::ScalarType t) {
  switch (t) {
    case at::kByte: case at::kBool: case at::kFloat: case at::kDouble: case at::kBFloat16: case at::kHalf:
      return true;
    default:
      return false;
  }
}

// Fills `out` (contiguous, CPU, a supported dtype, 0 <= p <= 1: the caller checks) and returns true; returns false,
// touching nothing, when the generator's bookkeeping is outside what the engine itself ever produces.
bool bernoulli_exact_(at::Tensor& out, double p, std::optional<at::Generator> gen) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && dtype_supported(out.scalar_type()),
              "exact bernoulli_: a contiguous CPU tensor of uint8, bool, float32, float64, bfloat16 or float16");
  TORCH_CHECK(p >= 0 && p <= 1, "exact bernoulli_: p must be in [0, 1], got ", p);
  auto* g = at::get_generator_or_default<at::CPUGeneratorImpl>(gen, at::detail::getDefaultCPUGenerator());
  const int64_t n = out.numel();
  const int64_t threshold = static_cast<int64_t>(std::ceil(std::ldexp(p, 53)));
  const at::ScalarType t = out.scalar_type();
  void* base = out.data_ptr();

  std::lock_guard<std::mutex> lock(g->mutex_);
  at::mt19937 engine = g->engine();
  at::mt19937_data_pod d = engine.data();
  if (d.left_ < 1 || static_cast<int64_t>(d.next_) + d.left_ > kN + 1) return false;

  alignas(64) uint32_t words[2 * kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t m = std::min(kChunk, n - start);
    outputs(d, words, 2 * m);
    if (t == at::kByte || t == at::kBool) compare8(words, m, threshold, static_cast<uint8_t*>(base) + start);
    else if (t == at::kFloat) compare32(words, m, threshold, static_cast<uint32_t*>(base) + start);
    else if (t == at::kDouble) compare64(words, m, threshold, static_cast<uint64_t*>(base) + start);
    else compare16(words, m, threshold, t == at::kBFloat16 ? 0x3f80 : 0x3c00, static_cast<uint16_t*>(base) + start);
  }
  engine.set_data(d);
  g->set_engine(engine);
  out.unsafeGetTensorImpl()->bump_version();
  return true;
}

}  // namespace

// Only ATen and the op registry (no torch/extension.h): the build takes seconds, not a minute. Registered as a
// composite op (one kernel for every dispatch key): no autograd fallback in between; the version bump is done here.
TORCH_LIBRARY(runlora_fx_rng, m) {
  m.def("bernoulli_(Tensor(a!) out, float p, Generator? generator=None) -> bool", &bernoulli_exact_);
}
