// One-pass shared-prefix attention for CPU tensors (float32): forward and backward.
//
// Why a kernel of our own: ATen's fused CPU attention takes one key sequence per request, so the
// split path ran it twice (own keys; the prefix broadcast over the batch), merged the two by
// log-sum-exp and did the prefix gradient with five more matrix products. Measured on 2 cores at
// B=16, Hq=8, Hkv=2, L=81, P=16, D=32, that cost 1.6 + 2.9 ms per layer (forward + backward)
// where one call over P + L copied keys costs 1.1 + 2.3 ms. Here each block of query rows takes
// its scores against the prefix keys and its own keys into one row buffer, so the row is read
// once, the softmax is exact (no merge), and the prefix gradient is accumulated per thread and
// reduced at the end: no request gets a copy of the prefix or of its gradient.
//
// Layouts: every tensor is addressed through its strides; only the last dim must be contiguous.
// Matrix products are column-major BLAS calls (a row-major (rows x D) block with row stride ld is
// a column-major (D x rows) matrix with the same ld): MKL's SGEMM_64 where the process has it
// (torch's x86-64 wheels export it from libtorch_cpu; ATen's own cpublas::gemm is not exported),
// else a plain loop. Log-sum-exp is natural log.
//
// Masking: own key j is visible to query row i iff kv_mask[b, j] (when given) and, if causal,
// j <= i + Lk - Lq (bottom-right aligned). Prefix key j of prefix g is visible to every row of
// the requests that read g iff prefix_mask[g, j] (when given; all are without it). A masked score
// is never used (its probability is set to exactly 0), so a NaN or Inf in a key a row cannot see
// does not reach it; NaN and Inf in visible entries propagate as in a plain matmul reference.
// Prefix keys outside [first visible, last visible] of their prefix (a left- or right-padded
// prompt) are not read at all: the matrix products run over that span only, so their gradient is
// exactly 0 and their cost is nothing; masked keys inside the span get probability 0. A row that
// sees no key (every prefix key masked, no visible own key) gives output 0, lse -inf and zero
// gradients.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// MKL's ILP64 Fortran SGEMM, resolved at load time if some loaded library defines it.
extern "C" void SGEMM_64(const char* transa, const char* transb, const int64_t* m, const int64_t* n,
                         const int64_t* k, const float* alpha, const float* a, const int64_t* lda, const float* b,
                         const int64_t* ldb, const float* beta, float* c, const int64_t* ldc) __attribute__((weak));

enum class TransposeType { NoTranspose, Transpose };

namespace blas {

// Tests switch BLAS off to check the loop (what a torch build without MKL's symbol runs).
std::atomic<bool> use_blas{true};

// C (m x n) = alpha op(A) op(B) + beta C, column-major; beta == 0 ignores C's old contents.
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const bool at = ta == TransposeType::Transpose, bt = tb == TransposeType::Transpose;
  if (use_blas && SGEMM_64 != nullptr && k > 0) {
    const char tA = at ? 'T' : 'N', tB = bt ? 'T' : 'N';
    SGEMM_64(&tA, &tB, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* cj = c + j * ldc;
    for (int64_t i = 0; i < m; ++i) cj[i] = beta == 0.0f ? 0.0f : beta * cj[i];
    for (int64_t l = 0; l < k; ++l) {
      const float bl = alpha * (bt ? b[j + l * ldb] : b[l + j * ldb]);
      if (at) {
        for (int64_t i = 0; i < m; ++i) cj[i] += a[l + i * lda] * bl;
      } else {
        const float* al = a + l * lda;
        for (int64_t i = 0; i < m; ++i) cj[i] += al[i] * bl;
      }
    }
  }
}

}  // namespace blas

bool has_blas() { return SGEMM_64 != nullptr; }

// Sets whether BLAS is used when present; returns the previous setting.
bool set_use_blas(bool enable) { return blas::use_blas.exchange(enable); }

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows of queries per block: a (rows x (P + Lk)) fp32 score buffer per thread, at most 4 MiB.
int64_t rows_per_block(int64_t keys) {
  return std::max<int64_t>(1, std::min<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(keys, 1)));
}

// The float whose bits are `bits`: std::bit_cast spelled for C++17, since torch's extension builder
// passes -std=c++17 in torch 2.11 (the GPU machine's) and -std=c++20 in torch 2.13.
inline float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// x = exp(x - shift), where x - shift <= 0 (scores minus their row max, or minus the row's lse),
// written so that GCC vectorises the loop (std::exp is a library call per element: ~5 ns, 5 ms per forward at the
// shape above). Cephes' single-precision polynomial, relative error ~2 ulp on [-87, 0]; below
// -87 (including -inf) the result is exactly 0; NaN stays NaN.
inline void exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float in = x[i] - shift;
    float v = in < -87.0f ? -87.0f : in;
    const float fx = std::floor(v * 1.44269504088896341f + 0.5f);
    v = v - fx * 0.693359375f;
    v = v + fx * 2.12194440e-4f;
    const float z = v * v;
    float y = 1.9875691500e-4f;
    y = y * v + 1.3981999507e-3f;
    y = y * v + 8.3334519073e-3f;
    y = y * v + 4.1665795894e-2f;
    y = y * v + 1.6666665459e-1f;
    y = y * v + 5.0000001201e-1f;
    y = y * z + v + 1.0f;
    const float pow2 = float_from_bits((static_cast<int32_t>(fx) + 127) << 23);
    const float r = y * pow2;
    x[i] = in < -87.0f ? 0.0f : r;
  }
}

struct Geometry {
  int64_t B, Hq, Hkv, Lq, Lk, P, D, G, group;
};

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pk) {
  Geometry g{};
  g.B = q.size(0);
  g.Hq = q.size(1);
  g.Lq = q.size(2);
  g.D = q.size(3);
  g.Hkv = k.size(1);
  g.Lk = k.size(2);
  g.G = pk.size(0);
  g.P = pk.size(2);
  g.group = g.Hq / g.Hkv;
  return g;
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " must have a contiguous last dim");
}

// The five attention inputs of both directions, checked; their sizes.
Geometry checked_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                          const at::Tensor& prefix_v) {
  check(q, "q");
  check(k, "k");
  check(v, "v");
  check(prefix_k, "prefix_k");
  check(prefix_v, "prefix_v");
  return geometry(q, k, prefix_k);
}

// Addresses a 4-D tensor (n, h, l, d) through its strides.
struct View4 {
  float* p;
  int64_t s0, s1, s2;
  explicit View4(const at::Tensor& t)
      : p(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)),
        s2(t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2)) {
    TORCH_CHECK(t.size(2) <= 1 || t.stride(2) >= t.size(3), "rows must not overlap (row stride >= D)");
  }
  float* at(int64_t a, int64_t b, int64_t c) const { return p + a * s0 + b * s1 + c * s2; }
};

// The prefix keys a prefix may show: none outside [lo, hi); inside, all unless `holes`, when
// prefix_mask says which.
struct Span {
  int64_t lo, hi;
  bool holes;
  int64_t size() const { return hi - lo; }
};

struct Masks {
  const int64_t* index = nullptr;  // (B,) prefix of each request, or none: prefix 0
  const bool* kv = nullptr;        // (B, Lk) visible own keys, or none: all
  const bool* pm = nullptr;        // (G, P) visible prefix keys, or none: all
  int64_t kv_s0 = 0, kv_s1 = 0, index_s0 = 0, pm_s0 = 0, pm_s1 = 0, P = 0;
  std::vector<Span> spans;  // one per prefix when pm is given
  Masks(const Geometry& g, const c10::optional<at::Tensor>& prefix_index, const c10::optional<at::Tensor>& kv_mask,
        const c10::optional<at::Tensor>& prefix_mask)
      : P(g.P) {
    if (prefix_index.has_value() && prefix_index->defined()) {
      TORCH_CHECK(prefix_index->scalar_type() == at::kLong, "prefix_index must be int64");
      index = prefix_index->data_ptr<int64_t>();
      index_s0 = prefix_index->stride(0);
    }
    if (kv_mask.has_value() && kv_mask->defined()) {
      TORCH_CHECK(kv_mask->scalar_type() == at::kBool, "kv_mask must be bool");
      kv = kv_mask->data_ptr<bool>();
      kv_s0 = kv_mask->stride(0);
      kv_s1 = kv_mask->stride(1);
    }
    if (prefix_mask.has_value() && prefix_mask->defined()) {
      const at::Tensor& t = *prefix_mask;
      TORCH_CHECK(t.device().is_cpu(), "prefix_mask must be a CPU tensor");
      TORCH_CHECK(t.scalar_type() == at::kBool, "prefix_mask must be bool");
      TORCH_CHECK(t.dim() == 2 && t.size(0) == g.G && t.size(1) == g.P, "prefix_mask must have shape (G, P) = (",
                  g.G, ", ", g.P, "), got ", t.sizes());
      pm = t.data_ptr<bool>();
      pm_s0 = t.stride(0);
      pm_s1 = t.stride(1);
      spans.reserve(static_cast<size_t>(g.G));
      for (int64_t p = 0; p < g.G; ++p) {
        const bool* row = pm + p * pm_s0;
        int64_t lo = 0, hi = g.P;
        while (lo < hi && !row[lo * pm_s1]) ++lo;
        while (hi > lo && !row[(hi - 1) * pm_s1]) --hi;
        bool holes = false;
        for (int64_t j = lo; j < hi && !holes; ++j) holes = !row[j * pm_s1];
        spans.push_back(Span{lo, hi, holes});
      }
    }
  }
  int64_t prefix_of(int64_t b) const { return index ? index[b * index_s0] : 0; }
  Span span_of(int64_t prefix) const { return pm ? spans[static_cast<size_t>(prefix)] : Span{0, P, false}; }
};

// Own keys a block of rows [i0, i1) may need: with causal masking, none past the last row's limit.
int64_t own_keys_for(const Geometry& g, bool causal, int64_t i1) {
  if (!causal) return g.Lk;
  return std::clamp<int64_t>(i1 - 1 + g.Lk - g.Lq + 1, 0, g.Lk);
}

// Scaled scores of rows [i0, i1) of head h of request b against the prefix's visible span
// (columns [sp.lo, sp.hi) of [0, P); the others are left for mask_row) and the request's own keys
// (columns [P, P + n_own)), into s with row stride ld.
void scores(const Geometry& g, const View4& Q, const View4& K, const View4& PK, int64_t b, int64_t h,
            int64_t prefix, const Span& sp, int64_t i0, int64_t rows, int64_t n_own, double scale, float* s,
            int64_t ld) {
  const int64_t hk = h / g.group;
  const float* qp = Q.at(b, h, i0);
  if (sp.size() > 0)
    blas::gemm(TransposeType::Transpose, TransposeType::NoTranspose, sp.size(), rows, g.D, static_cast<float>(scale),
               PK.at(prefix, hk, sp.lo), PK.s2, qp, Q.s2, 0.0f, s + sp.lo, ld);
  if (n_own > 0)
    blas::gemm(TransposeType::Transpose, TransposeType::NoTranspose, n_own, rows, g.D, static_cast<float>(scale),
               K.at(b, hk, 0), K.s2, qp, Q.s2, 0.0f, s + g.P, ld);
}

// Sets masked entries of row i (query position qi) to -inf: prefix keys outside the span or masked
// inside it, own keys past the causal limit or masked by kv_mask; returns the row's maximum over
// visible entries (-inf when it sees no key).
float mask_row(const Geometry& g, const Masks& m, bool causal, int64_t b, int64_t prefix, const Span& sp, int64_t qi,
               int64_t n_own, float* row) {
  std::fill(row, row + sp.lo, kNegInf);
  std::fill(row + sp.hi, row + g.P, kNegInf);
  if (sp.holes) {
    const bool* visible = m.pm + prefix * m.pm_s0;
    for (int64_t j = sp.lo; j < sp.hi; ++j)
      if (!visible[j * m.pm_s1]) row[j] = kNegInf;
  }
  const int64_t limit = causal ? std::clamp<int64_t>(qi + g.Lk - g.Lq + 1, 0, n_own) : n_own;
  float* own = row + g.P;
  for (int64_t j = limit; j < n_own; ++j) own[j] = kNegInf;
  if (m.kv) {
    const bool* visible = m.kv + b * m.kv_s0;
    for (int64_t j = 0; j < limit; ++j)
      if (!visible[j * m.kv_s1]) own[j] = kNegInf;
  }
  float mx = kNegInf;
  const int64_t n = g.P + n_own;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  return mx;
}

// (out (B, Hq, Lq, D) with memory (B, Lq, Hq, D), lse (B, Hq, Lq) float32, natural log)
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                           const c10::optional<at::Tensor>& prefix_index,
                                           const c10::optional<at::Tensor>& kv_mask, bool causal, double scale,
                                           const c10::optional<at::Tensor>& prefix_mask) {
  const Geometry g = checked_geometry(q, k, v, prefix_k, prefix_v);
  const Masks m(g, prefix_index, kv_mask, prefix_mask);  // checks the masks before any early return
  auto out = at::empty({g.B, g.Lq, g.Hq, g.D}, q.options()).transpose(1, 2);
  auto lse = at::empty({g.B, g.Hq, g.Lq}, q.options());
  if (g.B == 0 || g.Hq == 0 || g.Lq == 0) return {out, lse};
  const View4 Q(q), K(k), V(v), PK(prefix_k), PV(prefix_v), O(out);
  float* lse_p = lse.data_ptr<float>();
  const int64_t block = rows_per_block(g.P + g.Lk);
  const int64_t blocks = (g.Lq + block - 1) / block;
  at::parallel_for(0, g.B * g.Hq * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(block * (g.P + g.Lk)));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (g.Hq * blocks), h = item / blocks % g.Hq, i0 = item % blocks * block;
      const int64_t i1 = std::min(g.Lq, i0 + block), rows = i1 - i0;
      const int64_t n_own = own_keys_for(g, causal, i1), n = g.P + n_own, prefix = m.prefix_of(b);
      const Span sp = m.span_of(prefix);
      float* s = buf.data();
      scores(g, Q, K, PK, b, h, prefix, sp, i0, rows, n_own, scale, s, n);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = s + r * n;
        const float mx = mask_row(g, m, causal, b, prefix, sp, i0 + r, n_own, row);
        float* lse_row = lse_p + (b * g.Hq + h) * g.Lq + i0 + r;
        if (mx == kNegInf) {
          // The max skips NaN: all visible scores NaN (a NaN query) must give NaN, as the
          // reference's logsumexp does; no visible score at all gives output 0 and lse -inf.
          const bool nan = std::any_of(row, row + n, [](float x) { return std::isnan(x); });
          std::fill(row, row + n, nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
          *lse_row = nan ? std::numeric_limits<float>::quiet_NaN() : kNegInf;
          continue;
        }
        exp_shifted(row, n, mx);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += row[j];
        *lse_row = mx + std::log(sum);
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) row[j] *= inv;
      }
      float* o = O.at(b, h, i0);
      const int64_t hk = h / g.group;
      if (sp.size() == 0 && n_own == 0) {  // no key to read: every row sees nothing
        for (int64_t r = 0; r < rows; ++r) std::fill(o + r * O.s2, o + r * O.s2 + g.D, 0.0f);
        continue;
      }
      if (sp.size() > 0)
        blas::gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, g.D, rows, sp.size(), 1.0f,
                   PV.at(prefix, hk, sp.lo), PV.s2, s + sp.lo, n, 0.0f, o, O.s2);
      if (n_own > 0)
        blas::gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, g.D, rows, n_own, 1.0f,
                   V.at(b, hk, 0), V.s2, s + g.P, n, sp.size() > 0 ? 1.0f : 0.0f, o, O.s2);
    }
  });
  return {out, lse};
}

// Gradients (dq, dk, dv in (B, L, H, D) memory; dprefix_k, dprefix_v (G, Hkv, P, D)), given the
// forward's out and lse. delta = rowsum(dout * out) - dlse; p = exp(s - lse);
// dv = p^T dout, ds = p * (dout v^T - delta), dq = scale ds k, dk = scale ds^T q.
// Work items are (request, kv head): each owns its dk and dv rows; the prefix gradients are
// summed per chunk of items and the chunks' sums added at the end.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& prefix_index, const c10::optional<at::Tensor>& kv_mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale, const c10::optional<at::Tensor>& prefix_mask) {
  check(dout, "dout");
  check(out, "out");
  const Geometry g = checked_geometry(q, k, v, prefix_k, prefix_v);
  const Masks m(g, prefix_index, kv_mask, prefix_mask);
  auto dq = at::empty({g.B, g.Lq, g.Hq, g.D}, q.options()).transpose(1, 2);
  auto dk = at::zeros({g.B, g.Lk, g.Hkv, g.D}, q.options()).transpose(1, 2);
  auto dv = at::zeros({g.B, g.Lk, g.Hkv, g.D}, q.options()).transpose(1, 2);
  // Partial prefix gradients, one per chunk of work items: at most one per thread and fewer than
  // B / G, so that they never add up to a per-request prefix gradient (with B = 16 on 2 cores:
  // 2 partials of (G, Hkv, P, D) each for dprefix_k and dprefix_v).
  const int64_t items = g.B * g.Hkv;
  const int64_t chunks = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), (g.B - 1) / std::max<int64_t>(g.G, 1)),
                                             1, std::max<int64_t>(items, 1));
  const int64_t prefix_numel = g.G * g.Hkv * g.P * g.D;
  auto dpk_parts = at::zeros({chunks, g.G, g.Hkv, g.P, g.D}, q.options());
  auto dpv_parts = at::zeros({chunks, g.G, g.Hkv, g.P, g.D}, q.options());
  if (g.B == 0 || g.Hq == 0 || g.Lq == 0) {
    dq.zero_();
    return {dq, dk, dv, dpk_parts.sum(0), dpv_parts.sum(0)};
  }
  const View4 Q(q), K(k), V(v), PK(prefix_k), PV(prefix_v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  auto lse_c = lse.contiguous();
  const float* lse_p = lse_c.data_ptr<float>();
  at::Tensor dlse_c;
  const float* dlse_p = nullptr;
  if (dlse.has_value() && dlse->defined()) {
    dlse_c = dlse->to(at::kFloat).contiguous();
    dlse_p = dlse_c.data_ptr<float>();
  }
  float* dpk_all = dpk_parts.data_ptr<float>();
  float* dpv_all = dpv_parts.data_ptr<float>();
  const int64_t block = rows_per_block(g.P + g.Lk);
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> s_buf(static_cast<size_t>(block * (g.P + g.Lk)));
    std::vector<float> dp_buf(s_buf.size());
    std::vector<float> delta(static_cast<size_t>(block));
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* dpk = dpk_all + chunk * prefix_numel;
      float* dpv = dpv_all + chunk * prefix_numel;
      for (int64_t item = chunk * per_chunk; item < std::min(items, (chunk + 1) * per_chunk); ++item) {
        const int64_t b = item / g.Hkv, hk = item % g.Hkv, prefix = m.prefix_of(b);
        const Span sp = m.span_of(prefix);
        const int64_t lo = sp.lo, pn = sp.size();
        float* dpk_g = dpk + (prefix * g.Hkv + hk) * g.P * g.D;
        float* dpv_g = dpv + (prefix * g.Hkv + hk) * g.P * g.D;
        for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
          for (int64_t i0 = 0; i0 < g.Lq; i0 += block) {
            const int64_t i1 = std::min(g.Lq, i0 + block), rows = i1 - i0;
            const int64_t n_own = own_keys_for(g, causal, i1), n = g.P + n_own;
            float* dq_rows = dQ.at(b, h, i0);
            if (pn == 0 && n_own == 0) {  // no key to read: no gradient
              for (int64_t r = 0; r < rows; ++r) std::fill(dq_rows + r * dQ.s2, dq_rows + r * dQ.s2 + g.D, 0.0f);
              continue;
            }
            float* s = s_buf.data();
            float* dp = dp_buf.data();
            const float* q_rows = Q.at(b, h, i0);
            const float* do_rows = dO.at(b, h, i0);
            scores(g, Q, K, PK, b, h, prefix, sp, i0, rows, n_own, scale, s, n);
            for (int64_t r = 0; r < rows; ++r) {
              float* row = s + r * n;
              mask_row(g, m, causal, b, prefix, sp, i0 + r, n_own, row);
              const int64_t at_row = (b * g.Hq + h) * g.Lq + i0 + r;
              const float l = lse_p[at_row];
              if (l == kNegInf) {  // saw no key in the forward: no gradient
                std::fill(row, row + n, 0.0f);
                delta[r] = 0.0f;
                continue;
              }
              exp_shifted(row, n, l);
              const float* o = O.at(b, h, i0 + r);
              const float* d = do_rows + r * dO.s2;
              float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
              for (int64_t c = 0; c < g.D; ++c) acc += d[c] * o[c];
              delta[r] = acc - (dlse_p ? dlse_p[at_row] : 0.0f);
            }
            // Every product below runs over the prefix span [lo, lo + pn) and the own keys only:
            // the columns outside the span (p = 0 there) are never read, and their prefix
            // gradient rows are never written (exactly 0).
            // dp = dout [pv; v]^T
            if (pn > 0)
              blas::gemm(TransposeType::Transpose, TransposeType::NoTranspose, pn, rows, g.D, 1.0f,
                         PV.at(prefix, hk, lo), PV.s2, do_rows, dO.s2, 0.0f, dp + lo, n);
            if (n_own > 0)
              blas::gemm(TransposeType::Transpose, TransposeType::NoTranspose, n_own, rows, g.D, 1.0f,
                         V.at(b, hk, 0), V.s2, do_rows, dO.s2, 0.0f, dp + g.P, n);
            // dv += p^T dout (own keys), dprefix_v += p^T dout (prefix keys)
            if (pn > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::Transpose, g.D, pn, rows, 1.0f, do_rows, dO.s2,
                         s + lo, n, 1.0f, dpv_g + lo * g.D, g.D);
            if (n_own > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::Transpose, g.D, n_own, rows, 1.0f, do_rows, dO.s2,
                         s + g.P, n, 1.0f, dV.at(b, hk, 0), dV.s2);
            // ds = p * (dp - delta), in place of p, over the span and the own keys
            for (int64_t r = 0; r < rows; ++r) {
              float* row = s + r * n;
              const float* dpr = dp + r * n;
              const float dl = delta[r];
#pragma omp simd
              for (int64_t j = lo; j < lo + pn; ++j) row[j] = row[j] * (dpr[j] - dl);
#pragma omp simd
              for (int64_t j = g.P; j < n; ++j) row[j] = row[j] * (dpr[j] - dl);
            }
            // dq = scale ds [pk; k]
            if (pn > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, g.D, rows, pn,
                         static_cast<float>(scale), PK.at(prefix, hk, lo), PK.s2, s + lo, n, 0.0f, dq_rows, dQ.s2);
            if (n_own > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, g.D, rows, n_own,
                         static_cast<float>(scale), K.at(b, hk, 0), K.s2, s + g.P, n, pn > 0 ? 1.0f : 0.0f,
                         dq_rows, dQ.s2);
            // dk += scale ds^T q (own keys), dprefix_k += scale ds^T q (prefix keys)
            if (pn > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::Transpose, g.D, pn, rows,
                         static_cast<float>(scale), q_rows, Q.s2, s + lo, n, 1.0f, dpk_g + lo * g.D, g.D);
            if (n_own > 0)
              blas::gemm(TransposeType::NoTranspose, TransposeType::Transpose, g.D, n_own, rows,
                         static_cast<float>(scale), q_rows, Q.s2, s + g.P, n, 1.0f, dK.at(b, hk, 0), dK.s2);
          }
        }
      }
    }
  });
  return {dq, dk, dv, dpk_parts.sum(0), dpv_parts.sum(0)};
}

}  // namespace

TORCH_LIBRARY(prefix_kernels_cpu, m) {
  m.def("has_blas() -> bool", &has_blas);
  m.def("set_use_blas(bool enable) -> bool", &set_use_blas);
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? kv_mask, bool causal, float scale, Tensor? prefix_mask=None) -> (Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? kv_mask, Tensor out, Tensor lse, bool causal, float scale, "
      "Tensor? prefix_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prefix_kernels_cpu, CPU, m) {
  m.impl("fwd", &forward);
  m.impl("bwd", &backward);
}
