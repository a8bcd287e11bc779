/*
 * Shared-prefix decode attention: the CUDA kernels (torch-free).
 *
 * Three kernels, all on one stream, no host synchronisation:
 *
 *   prefix_kernel    grid (prefix row blocks, Hkv, prefix splits). For prefix g and kv head hk the
 *                    query rows of every request using g, times all Hq/Hkv query heads of hk, times
 *                    Lq, are stacked into one matrix; a block takes ROWS of those stacked rows and
 *                    one chunk of the prefix's keys. Each key tile is read from global memory once
 *                    per block and applied to all ROWS rows, so the prefix is read once per ROWS
 *                    stacked rows instead of once per request. prefix_mask row g applies to
 *                    every stacked row.
 *   request_kernel   grid (B * Hkv * row blocks, request splits): flash-decoding over each
 *                    request's own keys; a block holds all (Hq/Hkv) * Lq rows of one (b, hk)
 *                    (ROWS at a time) and one chunk of the keys; kv_mask and causal masking.
 *   merge_kernel     one warp per output row: combines the partial (out, lse) of every split by
 *                    log-sum-exp and writes out (q's dtype) and lse (natural log).
 *
 * With spd_args.fuse_parts the first two run as one launch, parts_kernel, their blocks interleaved.
 *
 * Inside an attention block, warp w owns stacked rows [16w, 16w + 16). Key tiles of N keys are
 * staged in shared memory with 16-byte cp.async copies, double-buffered; a key that its mask
 * hides is zero-filled, never read (the keys' visibility flags are staged two tiles ahead,
 * triple-buffered, so that the copies can skip them). Scores and the output accumulator live in
 * registers in the mma.sync m16n8k16 accumulator layout: lane = 4 * gid + tig holds rows gid and
 * gid + 8, columns 2 * tig and 2 * tig + 1 of every 8-column tile. fp16 and bf16
 * use the tensor cores (mma.sync, fp32 accumulation); fp32 uses CUDA-core FMAs on the same layout
 * (TF32 would be ~1000x less accurate than the float32 reference). Scores are in log2 units (the
 * scale is multiplied by log2(e) once); every lse in the workspace is base 2, and only the merge
 * converts to the natural log that leaves this file.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace spd {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kNoLimit = 0x7fffffff;  // causal limit of a row that sees every key

// Everything a kernel needs, passed by value (a few hundred bytes).
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;
  const void* pv;
  const uint8_t* mask;   // kv_mask (B, T), NULL: none
  const uint8_t* pmask;  // prefix_mask (G, P), NULL: none
  void* out;
  float* lse;
  const int32_t* order;         // NULL: every request uses prefix 0, in batch order (no tables)
  const int32_t* starts;
  const int32_t* block_starts;
  const void* pidx;             // prefix_index (B,), for group_kernel
  int64_t pidx_stride;
  int pidx64;                   // pidx is int64 (else int32)
  int32_t* group_ws;            // group_kernel's output: order, starts, block_starts, counters
  int rows_per_block;           // the attention kernels' ROWS (group_kernel sizes the row blocks)
  float* ws_out;
  float* ws_lse;
  int64_t sq[4], sk[4], sv[4], spk[4], spv[4], so[4];
  int64_t sm_b, sm_n;    // kv_mask strides
  int64_t spm_g, spm_n;  // prefix_mask strides
  int64_t rows_total;  // B * Hq * Lq
  int B, Hq, Hkv, Lq, T, G, P, D;
  int group;           // Hq / Hkv
  int group_rows;      // group * Lq
  int prefix_splits, prefix_chunk;
  int request_splits, request_chunk, request_row_blocks;
  int n_splits;        // prefix_splits + request_splits
  int64_t prefix_grid_x;  // the prefix part's row blocks (an upper bound), for parts_kernel
  int causal;
  int vec_q, vec_kv, vec_p;  // 16-byte copies allowed (unit D stride, aligned)
  float qk_scale;      // scale * log2(e)
};

// Tile shapes per (dtype, head dim), sized so that shared memory stays under the 99 KB per block
// that every sm_80+ GPU grants (sm_86 / sm_89 grant no more).
template <typename T, int D>
struct Config {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 in [16, 256]");
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int WARPS = (!kHalf && D > 128) ? 2 : 4;
  static constexpr int ROWS = 16 * WARPS;
  static constexpr int THREADS = 32 * WARPS;
  // Keys per tile: a multiple of 16 (one mma k-step) for 16-bit types, of 8 for fp32.
  static constexpr int N = kHalf ? (D <= 64 ? 64 : (D <= 128 ? 32 : 16)) : (D <= 64 ? 32 : (D <= 128 ? 16 : 8));
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  static constexpr int CHUNKS = D / VEC;                        // 16-byte copies per row
  static constexpr int LDS = D + VEC;  // shared row stride: 16 bytes of padding against bank conflicts
  static constexpr int PLD = N + 4;    // fp32 only: row stride of the per-warp probability buffer
  // Shared memory layout, in bytes; every offset is a multiple of 16.
  static constexpr int OFF_QOFF = 0;                                // int64 [ROWS] q element offset, -1: no row
  static constexpr int OFF_OROW = OFF_QOFF + 8 * ROWS;              // int64 [ROWS] output row
  static constexpr int OFF_LIM = OFF_OROW + 8 * ROWS;               // int32 [ROWS] causal limit
  static constexpr int OFF_VALID = OFF_LIM + 4 * ROWS;              // uint8 [3][N] key visible (mask, range)
  static constexpr int OFF_Q = (OFF_VALID + 3 * N + 15) / 16 * 16;  // T [ROWS][LDS]
  static constexpr int OFF_K = OFF_Q + static_cast<int>(sizeof(T)) * ROWS * LDS;  // T [2][N][LDS]
  static constexpr int OFF_V = OFF_K + 2 * static_cast<int>(sizeof(T)) * N * LDS; // T [2][N][LDS]
  static constexpr int OFF_P = OFF_V + 2 * static_cast<int>(sizeof(T)) * N * LDS; // fp32: float [WARPS][16][PLD]
  static constexpr int SMEM = OFF_P + (kHalf ? 0 : 4 * WARPS * 16 * PLD);
  static_assert(SMEM <= 99 * 1024, "tile does not fit the shared memory of every sm_80+ GPU");
  // Blocks per multiprocessor the attention kernels ask registers for (__launch_bounds__): as
  // many as shared memory allows on an H100 where 65536 / (THREADS x that) registers hold the
  // kernel without spills. Four (128 registers) at 16-bit 64 < D <= 128 (at most 53 KB a block)
  // and fp32 D <= 96; three (170) at 16-bit D = 64, where 128 spilled, and fp32 D = 128 (73 KB a
  // block). Stating a minimum matters: without one ptxas took up to 172, with one up to 184
  // (benchmarks/NOTES.md, "CUDA decode kernels after issue 18").
  static constexpr int MIN_BLOCKS = D > 128 ? 1 : (kHalf ? (D > 64 ? 4 : 3) : (D <= 96 ? 4 : 3));
};

// ------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------

// Raw element bits: tiles are copied as bits, so zero-filling writes +0.0 for every dtype.
template <typename T>
using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats rounded to a 16-bit type and packed: lo in bits 0-15, hi in bits 16-31 (the order
// mma.sync expects for the lower and higher column of a pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

#ifdef SPD_EMULATE
// Host emulation (tests/cuda_emu): the same PTX helpers without PTX.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    spd_emu_mma16816<spd_emu_half_to_float>(d, a0, a1, a2, a3, b0, b1);
  } else {
    spd_emu_mma16816<spd_emu_bf16_to_float>(d, a0, a1, a2, a3, b0, b1);
  }
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  spd_emu_cp_async16(smem, gmem, full);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {}
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  spd_emu_ldmatrix_x4(r, row, TRANS);
}
#else
// d (16x8, fp32) += a (16x16, row-major) * b (16x8, column-major), one warp.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                 uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy; when !full the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = full ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Four 8x8 matrices of 16-bit elements from shared memory in one instruction (one warp). Lane l
// gives the address of row l % 8 of matrix l / 8 (16-byte aligned). r[i] receives matrix i's
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1), lower column in bits 0-15: an mma
// A or B fragment. TRANS: the matrices transposed, i.e. elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4), which turns a row-major V tile into the B operand of P V.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}
#endif  // SPD_EMULATE


// ------------------------------------------------------------------------------------------------
// Tile loads (all threads of the block)
// ------------------------------------------------------------------------------------------------

// One key tile: N keys of K and V (key n at kb + n * ksn, column d at + d * ksd; likewise V) ->
// shared [N][LDS] each. Key n is staged iff vis[n] (shared memory, written and synchronised
// before the call); any other key becomes zeros and its memory is never read, so a masked key (a
// padding slot of a prefix or of a cache) contributes nothing, not even a NaN or Inf through
// 0 * v. vec: 16-byte cp.async copies (caller checked unit column strides and alignment), else
// element loads and shared stores (visible after the next __syncthreads).
template <typename T, int D>
__device__ __forceinline__ void load_kv(T* ks, T* vs, const uint8_t* vis, const T* kb, int64_t ksn, int64_t ksd,
                                        const T* vb, int64_t vsn, int64_t vsd, bool vec) {
  using C = Config<T, D>;
  constexpr int N = C::N;
  if (vec) {
    constexpr int TOTAL = N * C::CHUNKS;
    constexpr int ITERS = (TOTAL + C::THREADS - 1) / C::THREADS;
    static_assert(ITERS <= 32, "one bit per copy");
    unsigned ok = 0;  // bit i: the key of this thread's i-th chunk is staged (read before any copy)
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * C::THREADS;
      if ((TOTAL % C::THREADS == 0 || c < TOTAL) && vis[c / C::CHUNKS] != 0) ok |= 1u << i;
    }
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * C::THREADS;
      if (TOTAL % C::THREADS == 0 || c < TOTAL) {
        const int r = c / C::CHUNKS;
        const int col = (c % C::CHUNKS) * C::VEC;
        const bool full = (ok >> i) & 1u;
        cp_async16(ks + r * C::LDS + col, full ? kb + r * ksn + col : kb, full);
        cp_async16(vs + r * C::LDS + col, full ? vb + r * vsn + col : vb, full);
      }
    }
  } else {
    const Bits<T>* ksrc = reinterpret_cast<const Bits<T>*>(kb);
    const Bits<T>* vsrc = reinterpret_cast<const Bits<T>*>(vb);
    Bits<T>* kdst = reinterpret_cast<Bits<T>*>(ks);
    Bits<T>* vdst = reinterpret_cast<Bits<T>*>(vs);
    for (int e = threadIdx.x; e < N * D; e += C::THREADS) {
      const int r = e / D;
      const int col = e % D;
      const bool ok = vis[r] != 0;
      kdst[r * C::LDS + col] = ok ? ksrc[r * ksn + col * ksd] : Bits<T>(0);
      vdst[r * C::LDS + col] = ok ? vsrc[r * vsn + col * vsd] : Bits<T>(0);
    }
  }
}

// The block's query rows: row r starts at q + qoff[r] (qoff[r] < 0: no row, zeros).
template <typename T, int D>
__device__ __forceinline__ void load_q(T* smem, const T* q, const int64_t* qoff, int64_t sqd, bool vec) {
  using C = Config<T, D>;
  if (vec) {
    for (int c = threadIdx.x; c < C::ROWS * C::CHUNKS; c += C::THREADS) {
      const int r = c / C::CHUNKS;
      const int col = (c % C::CHUNKS) * C::VEC;
      const int64_t off = qoff[r];
      cp_async16(smem + r * C::LDS + col, off >= 0 ? q + off + col : q, off >= 0);
    }
  } else {
    const Bits<T>* src = reinterpret_cast<const Bits<T>*>(q);
    Bits<T>* dst = reinterpret_cast<Bits<T>*>(smem);
    for (int e = threadIdx.x; e < C::ROWS * D; e += C::THREADS) {
      const int r = e / D;
      const int col = e % D;
      const int64_t off = qoff[r];
      dst[r * C::LDS + col] = off >= 0 ? src[off + col * sqd] : Bits<T>(0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The attention block: ROWS query rows (described in shared memory) x keys [key_begin, key_end)
// ------------------------------------------------------------------------------------------------

// Keys of one segment (a prefix, or one request's own keys) of one kv head.
template <typename T>
struct KeySegment {
  const T* k;            // key 0 of the segment
  const T* v;
  int64_t skn, skd;      // key and column strides of k
  int64_t svn, svd;
  const uint8_t* mask;   // mask[key * mask_stride] != 0: visible (else never read); NULL: all visible
  int64_t mask_stride;
  bool vec;              // 16-byte copies allowed for k and v
};

// Before the call: row descriptors in shared memory (qoff, orow, lim) written and synchronised.
// Writes partial results (normalised out, base-2 lse) of every valid row to workspace `slot`.
template <typename T, int D>
__device__ __forceinline__ void attend(const Params& p, unsigned char* smem, const KeySegment<T>& seg,
                                       int key_begin, int key_end, int slot) {
  using C = Config<T, D>;
  constexpr int N = C::N;
  constexpr int LDS = C::LDS;
  constexpr int NT = N / 8;  // 8-key score tiles per key tile
  constexpr int DT = D / 8;  // 8-column output tiles

  const int64_t* qoff_s = reinterpret_cast<const int64_t*>(smem + C::OFF_QOFF);
  const int64_t* orow_s = reinterpret_cast<const int64_t*>(smem + C::OFF_OROW);
  const int* lim_s = reinterpret_cast<const int*>(smem + C::OFF_LIM);
  uint8_t* valid_s = reinterpret_cast<uint8_t*>(smem + C::OFF_VALID);
  T* q_s = reinterpret_cast<T*>(smem + C::OFF_Q);
  T* k_s = reinterpret_cast<T*>(smem + C::OFF_K);
  T* v_s = reinterpret_cast<T*>(smem + C::OFF_V);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2;  // accumulator rows gid and gid + 8 of the warp's 16
  const int tig = lane & 3;   // accumulator columns 2 tig, 2 tig + 1 of every 8-column tile
  const int r0 = warp * 16 + gid;
  const int r1 = r0 + 8;
  // Rows are filled in order, so a warp has work iff its first row exists (warp-uniform).
  const bool active = qoff_s[warp * 16] >= 0;
  const int lim0 = lim_s[r0];
  const int lim1 = lim_s[r1];

  const int nkeys = key_end > key_begin ? key_end - key_begin : 0;
  const int ntiles = (nkeys + N - 1) / N;

  // Tile `it`'s key visibility (in the segment and not masked) -> valid_s[it % 3], two tiles
  // ahead of its use: the copies of tile `it` (one iteration later) read it to skip masked keys,
  // so it must be synchronised before them. Slot it % 3 was last read by tile it - 3's compute.
  auto load_flags = [&](int it) {
    const int n0 = key_begin + it * N;
    const int valid = key_end - n0 < N ? key_end - n0 : N;
    for (int n = threadIdx.x; n < N; n += C::THREADS) {
      bool ok = n < valid;
      if (ok && seg.mask != nullptr) ok = seg.mask[static_cast<int64_t>(n0 + n) * seg.mask_stride] != 0;
      valid_s[(it % 3) * N + n] = ok ? 1 : 0;
    }
  };
  // Stages tile `it` into buffer `buf`: K, V (zeros past the segment and for masked keys).
  auto load_tile = [&](int it, int buf) {
    const int n0 = key_begin + it * N;
    load_kv<T, D>(k_s + buf * N * LDS, v_s + buf * N * LDS, valid_s + (it % 3) * N, seg.k + n0 * seg.skn,
                  seg.skn, seg.skd, seg.v + n0 * seg.svn, seg.svn, seg.svd, seg.vec);
  };

  float acc[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
  }
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows r0, r1
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running sum of exp2

  load_q<T, D>(q_s, reinterpret_cast<const T*>(p.q), qoff_s, p.sq[3], p.vec_q != 0);
  if (ntiles > 0) load_flags(0);
  if (ntiles > 1) load_flags(1);
  __syncthreads();  // the flags of tiles 0 and 1, before their copies
  if (ntiles > 0) load_tile(0, 0);
  cp_async_commit();

  for (int it = 0; it < ntiles; ++it) {
    const int buf = it & 1;
    // Tile it + 2's flags go to the slot of tile it - 1, whose compute ended with __syncthreads;
    // tile it + 1's flags were written in iteration it - 1 (or before the loop), before a barrier.
    if (it + 2 < ntiles) load_flags(it + 2);
    // The other buffer was last read in iteration it - 1, which ended with __syncthreads.
    if (it + 1 < ntiles) load_tile(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the newest group: Q and tile `it` have landed
    __syncthreads();

    if (active) {
      const T* kt = k_s + buf * N * LDS;
      const T* vt = v_s + buf * N * LDS;
      const uint8_t* vis = valid_s + (it % 3) * N;
      float s[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
      }

      // ---- S = Q K^T --------------------------------------------------------------------------
      if constexpr (C::kHalf) {
        static_assert(NT % 2 == 0, "ldmatrix_x4 takes two 8-key tiles at a time");
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          // Q's A fragment: the warp's rows 0-7 and 8-15 at columns 16 kk (a0, a1), then + 8 (a2, a3).
          // Reloaded every tile rather than held in registers: D / 4 more registers a thread (ptxas
          // then took about 168 at D = 128) would cost a block per multiprocessor, for one ldmatrix
          // in eight mma here (benchmarks/NOTES.md, "CUDA decode: shared-memory loads per mma").
          uint32_t a[4];
          ldmatrix_x4<false>(a, q_s + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int j = 0; j < NT; j += 2) {
            // K rows are keys (the mma's n), contiguous in the head dim (its k): matrices keys
            // 8j..8j+7 at columns 16 kk and 16 kk + 8 (b0, b1 of tile j), then tile j + 1's.
            uint32_t b[4];
            ldmatrix_x4<false>(b, kt + ((j + (lane >> 4)) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
            mma16816<T>(s[j], a[0], a[1], a[2], a[3], b[0], b[1]);
            mma16816<T>(s[j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
          }
        }
      } else {
        const float* qa = reinterpret_cast<const float*>(q_s) + r0 * LDS;
        const float* qb = reinterpret_cast<const float*>(q_s) + r1 * LDS;
        const float* kf = reinterpret_cast<const float*>(kt);
#pragma unroll 2
        for (int d = 0; d < D; d += 4) {
          const float4 x = *reinterpret_cast<const float4*>(qa + d);
          const float4 y = *reinterpret_cast<const float4*>(qb + d);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float4 kv = *reinterpret_cast<const float4*>(kf + (j * 8 + 2 * tig + e) * LDS + d);
              s[j][e] += x.x * kv.x + x.y * kv.y + x.z * kv.z + x.w * kv.w;
              s[j][2 + e] += y.x * kv.x + y.y * kv.y + y.z * kv.z + y.w * kv.w;
            }
          }
        }
      }

      // ---- scale, mask, online softmax (log2 units) -------------------------------------------
      const int n0 = key_begin + it * N;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int col = j * 8 + 2 * tig + (c & 1);
          const int lim = c < 2 ? lim0 : lim1;
          const bool ok = vis[col] != 0 && n0 + col <= lim;
          s[j][c] = ok ? s[j][c] * p.qk_scale : -INFINITY;
        }
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[hr], mx);
        // Nothing visible yet: exponentiate against 0 so that exp2(-inf - -inf) never makes a NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_run[hr] - m_use);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pr = exp2f(s[j][2 * hr + e] - m_use);
            s[j][2 * hr + e] = pr;
            sum += pr;
          }
        }
        l_run[hr] = l_run[hr] * alpha + sum;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          acc[j][2 * hr] *= alpha;
          acc[j][2 * hr + 1] *= alpha;
        }
        m_run[hr] = m_new;
      }

      // ---- O += P V -----------------------------------------------------------------------------
      if constexpr (C::kHalf) {
        static_assert(DT % 2 == 0, "ldmatrix_x4 takes two 8-column tiles at a time");
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk) {
          // The accumulator layout of score tiles 2kk, 2kk+1 is the A-operand layout of keys
          // [16kk, 16kk + 16): probabilities go to the tensor cores without leaving registers.
          const uint32_t a0 = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          const uint32_t a1 = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          const uint32_t a2 = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          const uint32_t a3 = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int j = 0; j < DT; j += 2) {
            // V is row-major (keys x columns); the B operand needs key pairs of one column, so
            // the matrices are loaded transposed: keys 16kk..+7 and +8..+15 of columns 8j..8j+7
            // (b0, b1 of tile j), then of columns 8j+8.. (tile j + 1).
            uint32_t b[4];
            ldmatrix_x4<true>(b, vt + (kk * 16 + (lane & 15)) * LDS + (j + (lane >> 4)) * 8);
            mma16816<T>(acc[j], a0, a1, a2, a3, b[0], b[1]);
            mma16816<T>(acc[j + 1], a0, a1, a2, a3, b[2], b[3]);
          }
        }
      } else {
        // The lane needs every key's probability for its rows: exchange through shared memory.
        float* pw = reinterpret_cast<float*>(smem + C::OFF_P) + warp * 16 * C::PLD;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int c = 0; c < 4; ++c) pw[(gid + (c >> 1) * 8) * C::PLD + j * 8 + 2 * tig + (c & 1)] = s[j][c];
        }
        __syncwarp();
        const float* vf = reinterpret_cast<const float*>(vt);
#pragma unroll 2
        for (int n = 0; n < N; ++n) {
          const float pa = pw[gid * C::PLD + n];
          const float pb = pw[(gid + 8) * C::PLD + n];
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            const float2 x = *reinterpret_cast<const float2*>(vf + n * LDS + j * 8 + 2 * tig);
            acc[j][0] += pa * x.x;
            acc[j][1] += pa * x.y;
            acc[j][2] += pb * x.x;
            acc[j][3] += pb * x.y;
          }
        }
        __syncwarp();  // pw is rewritten by the next tile
      }
    }
    __syncthreads();  // the next iteration's copies overwrite this buffer
  }
  cp_async_wait<0>();  // nothing may stay in flight (ntiles == 0 still issued the Q copies)

  if (active) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_run[hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int row = hr ? r1 : r0;
      if (qoff_s[row] < 0) continue;
      // No visible key in this block's range. A NaN score leaves l NaN (fmaxf skips NaN, the
      // exponential does not), which must come out as NaN, as in the reference, not as empty.
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : 1.f / l;
      const int64_t ws_row = static_cast<int64_t>(slot) * p.rows_total + orow_s[row];
      float* dst = p.ws_out + ws_row * D;
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        *reinterpret_cast<float2*>(dst + j * 8 + 2 * tig) = make_float2(acc[j][2 * hr] * inv, acc[j][2 * hr + 1] * inv);
      }
      if (tig == 0) p.ws_lse[ws_row] = empty ? -INFINITY : m_run[hr] + log2f(l);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

// blockIdx.x: row block over all prefixes (block_starts maps it to prefix g), blockIdx.y: kv head,
// blockIdx.z: prefix split.
template <typename T, int D>
__device__ __forceinline__ void prefix_block(const Params& p, unsigned char* smem, int rb, int hk, int split) {
  using C = Config<T, D>;
  int g = 0, first = 0;
  int64_t stacked = static_cast<int64_t>(p.B) * p.group_rows;  // no tables: every request on prefix 0
  int64_t row0 = static_cast<int64_t>(rb) * C::ROWS;
  if (p.order != nullptr) {
    if (rb >= p.block_starts[p.G]) return;  // the grid is an upper bound (whole block exits)
    // Prefix g owns row blocks [block_starts[g], block_starts[g+1]): largest g with block_starts[g] <= rb.
    int lo = 0, hi = p.G;  // block_starts[lo] <= rb < block_starts[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (p.block_starts[mid] <= rb) lo = mid; else hi = mid;
    }
    g = lo;
    first = p.starts[g];
    stacked = static_cast<int64_t>(p.starts[g + 1] - first) * p.group_rows;
    row0 = static_cast<int64_t>(rb - p.block_starts[g]) * C::ROWS;
  } else if (row0 >= stacked) {
    return;
  }

  int64_t* qoff_s = reinterpret_cast<int64_t*>(smem + C::OFF_QOFF);
  int64_t* orow_s = reinterpret_cast<int64_t*>(smem + C::OFF_OROW);
  int* lim_s = reinterpret_cast<int*>(smem + C::OFF_LIM);
  for (int t = threadIdx.x; t < C::ROWS; t += C::THREADS) {
    const int64_t srow = row0 + t;  // stacked row: (request of prefix g, head of group, query row)
    int64_t qoff = -1, orow = 0;
    if (srow < stacked) {
      const int64_t pos = first + srow / p.group_rows;
      const int64_t b = p.order != nullptr ? p.order[pos] : pos;
      const int r = static_cast<int>(srow % p.group_rows);
      const int h = hk * p.group + r / p.Lq;
      const int i = r % p.Lq;
      qoff = b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
      orow = (b * p.Hq + h) * p.Lq + i;
    }
    qoff_s[t] = qoff;
    orow_s[t] = orow;
    lim_s[t] = kNoLimit;  // no causal limit on prefix keys (prefix_mask, if any, applies to all rows)
  }
  __syncthreads();

  KeySegment<T> seg;
  seg.k = reinterpret_cast<const T*>(p.pk) + g * p.spk[0] + hk * p.spk[1];
  seg.v = reinterpret_cast<const T*>(p.pv) + g * p.spv[0] + hk * p.spv[1];
  seg.skn = p.spk[2];
  seg.skd = p.spk[3];
  seg.svn = p.spv[2];
  seg.svd = p.spv[3];
  seg.mask = p.pmask != nullptr ? p.pmask + g * p.spm_g : nullptr;
  seg.mask_stride = p.spm_n;
  seg.vec = p.vec_p != 0;
  const int begin = split * p.prefix_chunk;
  const int end = begin + p.prefix_chunk < p.P ? begin + p.prefix_chunk : p.P;
  attend<T, D>(p, smem, seg, begin, end, split);
}

template <typename T, int D>
__global__ void __launch_bounds__(Config<T, D>::THREADS, Config<T, D>::MIN_BLOCKS) prefix_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  prefix_block<T, D>(p, smem, blockIdx.x, blockIdx.y, blockIdx.z);
}

// x: (b * Hkv + hk) * request_row_blocks + row block, split: along T.
template <typename T, int D>
__device__ __forceinline__ void request_block(const Params& p, unsigned char* smem, int64_t x, int split) {
  using C = Config<T, D>;
  const int rbl = static_cast<int>(x % p.request_row_blocks);
  const int64_t bh = x / p.request_row_blocks;
  const int hk = static_cast<int>(bh % p.Hkv);
  const int64_t b = bh / p.Hkv;

  int64_t* qoff_s = reinterpret_cast<int64_t*>(smem + C::OFF_QOFF);
  int64_t* orow_s = reinterpret_cast<int64_t*>(smem + C::OFF_OROW);
  int* lim_s = reinterpret_cast<int*>(smem + C::OFF_LIM);
  for (int t = threadIdx.x; t < C::ROWS; t += C::THREADS) {
    const int r = rbl * C::ROWS + t;  // row of (b, hk): head r / Lq of the group, query row r % Lq
    int64_t qoff = -1, orow = 0;
    int lim = kNoLimit;
    if (r < p.group_rows) {
      const int h = hk * p.group + r / p.Lq;
      const int i = r % p.Lq;
      qoff = b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
      orow = (b * p.Hq + h) * p.Lq + i;
      if (p.causal) lim = i + (p.T - p.Lq);  // bottom-right: own key j visible iff j <= i + T - Lq
    }
    qoff_s[t] = qoff;
    orow_s[t] = orow;
    lim_s[t] = lim;
  }
  __syncthreads();

  KeySegment<T> seg;
  seg.k = reinterpret_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  seg.v = reinterpret_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  seg.skn = p.sk[2];
  seg.skd = p.sk[3];
  seg.svn = p.sv[2];
  seg.svd = p.sv[3];
  seg.mask = p.mask != nullptr ? p.mask + b * p.sm_b : nullptr;
  seg.mask_stride = p.sm_n;
  seg.vec = p.vec_kv != 0;
  const int begin = split * p.request_chunk;
  const int end = begin + p.request_chunk < p.T ? begin + p.request_chunk : p.T;
  attend<T, D>(p, smem, seg, begin, end, p.prefix_splits + split);
}

// blockIdx.x: (b * Hkv + hk) * request_row_blocks + row block, blockIdx.y: split along T.
template <typename T, int D>
__global__ void __launch_bounds__(Config<T, D>::THREADS, Config<T, D>::MIN_BLOCKS) request_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  request_block<T, D>(p, smem, blockIdx.x, blockIdx.y);
}

// Both attention parts in one 1-D grid (spd_args.fuse_parts): blocks alternate between the prefix
// part and the request part while both have blocks left, then the larger part's rest follows.
// Why: from B of about 74 on an H100 the prefix part is compute-bound (4B flop per byte) and the
// request part memory-bound; in two launches the step costs the sum of the two, in one grid
// a multiprocessor can hold a block of each (the same shared memory and threads: one Config).
// Each part's blocks keep the order of their own launch (x fastest), so that blocks running at
// the same time still read the same prefix tiles from L2.
// Launch bounds: at least 2 blocks per multiprocessor (one of each part), i.e. up to 255
// registers for 128 threads. Both parts are inlined here; ptxas then takes about 160 to 235
// registers. Without a stated minimum, ptxas (CUDA 13, sm_90a) squeezed some instantiations into
// 128 with a few bytes of spills, which the strict build rejects (tests/test_csrc_compile.py).
template <typename T, int D>
__global__ void __launch_bounds__(Config<T, D>::THREADS, 2) parts_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t prefix_x = p.prefix_grid_x;
  const int64_t n_prefix = prefix_x * p.Hkv * p.prefix_splits;
  const int64_t request_x = static_cast<int64_t>(p.B) * p.Hkv * p.request_row_blocks;
  const int64_t n_request = request_x * p.request_splits;
  const int64_t both = n_prefix < n_request ? n_prefix : n_request;
  const int64_t id = blockIdx.x;
  const bool paired = id < 2 * both;
  const bool is_prefix = paired ? (id % 2 == 0) : (n_prefix > n_request);
  const int64_t idx = paired ? id / 2 : id - both;
  if (is_prefix) {
    prefix_block<T, D>(p, smem, static_cast<int>(idx % prefix_x), static_cast<int>((idx / prefix_x) % p.Hkv),
                       static_cast<int>(idx / (prefix_x * p.Hkv)));
  } else {
    request_block<T, D>(p, smem, idx % request_x, static_cast<int>(idx / request_x));
  }
}

constexpr int kGroupThreads = 256;
constexpr int kGroupSmem = 3 * kGroupThreads * 4;

// prefix_index -> the tables prefix_block reads, in one block on the device (replacing a sort,
// a search and a handful of small torch ops per call in the binding). group_ws holds, in int32:
//   order[B]          the requests of prefix 0, then of prefix 1, ..., each in batch order
//   starts[G + 1]     order[starts[g] .. starts[g+1]) use prefix g
//   block_starts[G+1] prefix g's first row block: ceil(count * group_rows / rows_per_block) each
//   counter[G]        scratch: per-prefix counts, then placement cursors
// A request whose index is outside [0, G) is left out (the public op checks the range).
__device__ __forceinline__ int prefix_of(const Params& p, int64_t b) {
  const int64_t g = p.pidx64 ? static_cast<const int64_t*>(p.pidx)[b * p.pidx_stride]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.pidx)[b * p.pidx_stride]);
  return (g >= 0 && g < p.G) ? static_cast<int>(g) : -1;
}

__global__ void __launch_bounds__(kGroupThreads) group_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* s_idx = reinterpret_cast<int*>(smem);  // [kGroupThreads]
  int* s_cnt = s_idx + kGroupThreads;         // [kGroupThreads] scan of counts
  int* s_blk = s_cnt + kGroupThreads;         // [kGroupThreads] scan of row blocks
  const int t = static_cast<int>(threadIdx.x);
  int32_t* order = p.group_ws;
  int32_t* starts = order + p.B;
  int32_t* bstarts = starts + p.G + 1;
  int32_t* counter = bstarts + p.G + 1;

  for (int g = t; g < p.G; g += kGroupThreads) counter[g] = 0;
  __syncthreads();
  for (int b = t; b < p.B; b += kGroupThreads) {
    const int g = prefix_of(p, b);
    if (g >= 0) atomicAdd(&counter[g], 1);
  }
  __syncthreads();
  // Exclusive prefix sums of the counts and of the row blocks, kGroupThreads prefixes at a time
  // (Hillis-Steele in shared memory), carried across chunks.
  int carry_cnt = 0, carry_blk = 0;
  for (int g0 = 0; g0 < p.G; g0 += kGroupThreads) {
    const int g = g0 + t;
    const int cnt = g < p.G ? counter[g] : 0;
    s_cnt[t] = cnt;
    s_blk[t] = static_cast<int>((static_cast<int64_t>(cnt) * p.group_rows + p.rows_per_block - 1) / p.rows_per_block);
    __syncthreads();
    for (int off = 1; off < kGroupThreads; off <<= 1) {
      const int add_cnt = t >= off ? s_cnt[t - off] : 0;
      const int add_blk = t >= off ? s_blk[t - off] : 0;
      __syncthreads();
      s_cnt[t] += add_cnt;
      s_blk[t] += add_blk;
      __syncthreads();
    }
    if (g < p.G) {
      starts[g + 1] = carry_cnt + s_cnt[t];
      bstarts[g + 1] = carry_blk + s_blk[t];
    }
    carry_cnt += s_cnt[kGroupThreads - 1];
    carry_blk += s_blk[kGroupThreads - 1];
    __syncthreads();  // the next chunk rewrites s_cnt, s_blk
  }
  if (t == 0) {
    starts[0] = 0;
    bstarts[0] = 0;
  }
  for (int g = t; g < p.G; g += kGroupThreads) counter[g] = 0;
  __syncthreads();
  // Stable placement, kGroupThreads requests at a time: a request goes after the requests of its
  // prefix in earlier chunks (counter) and before those later in its own chunk (rank).
  for (int b0 = 0; b0 < p.B; b0 += kGroupThreads) {
    const int b = b0 + t;
    const int g = b < p.B ? prefix_of(p, b) : -1;
    s_idx[t] = g;
    __syncthreads();
    if (g >= 0) {
      int rank = 0;
      for (int u = 0; u < t; ++u) rank += s_idx[u] == g ? 1 : 0;
      order[starts[g] + counter[g] + rank] = b;
    }
    __syncthreads();  // every read of counter before this chunk's additions
    if (g >= 0) atomicAdd(&counter[g], 1);
    __syncthreads();  // the additions, and s_idx free, before the next chunk
  }
}

constexpr int kMergeWarps = 4;
constexpr int kMergeVecs = 2;  // float4 per lane: D <= 256

// One warp per output row (b, h, i): out = sum_s w_s out_s / sum_s w_s with w_s = exp2(lse_s - max).
// The splits are taken in parallel: lane s reads split s's lse (32 at a time), the warp reduces
// the maximum and the weights by shuffles, and each split's D floats are read as float4 by the
// lanes together, the loads of several splits in flight at once (no lse load between them).
// acc += w x, except that an empty split (w = 0) adds nothing even if its partial holds a NaN.
__device__ __forceinline__ void add_weighted(float4& acc, float w, const float4& x) {
  acc.x += w != 0.f ? w * x.x : 0.f;
  acc.y += w != 0.f ? w * x.y : 0.f;
  acc.z += w != 0.f ? w * x.z : 0.f;
  acc.w += w != 0.f ? w * x.w : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_kernel(const Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= p.rows_total) return;
  const int i = static_cast<int>(row % p.Lq);
  const int64_t bh = row / p.Lq;
  const int h = static_cast<int>(bh % p.Hq);
  const int64_t b = bh / p.Hq;

  float mx = -INFINITY;
  for (int s = lane; s < p.n_splits; s += 32) mx = fmaxf(mx, p.ws_lse[s * p.rows_total + row]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  // fmaxf skips a NaN lse; its weight exp2(NaN) does not, so a NaN split makes the row NaN.
  const float m_use = mx == -INFINITY ? 0.f : mx;

  float4 acc[kMergeVecs];
#pragma unroll
  for (int u = 0; u < kMergeVecs; ++u) acc[u] = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;  // this lane's splits
  for (int s0 = 0; s0 < p.n_splits; s0 += 32) {
    const int s_lane = s0 + lane;
    const float w_lane = s_lane < p.n_splits ? exp2f(p.ws_lse[s_lane * p.rows_total + row] - m_use) : 0.f;
    wsum += w_lane;
    const int count = p.n_splits - s0 < 32 ? p.n_splits - s0 : 32;
    // Two splits a step, both loads issued before either is used.
    for (int t = 0; t < count; t += 2) {
      const bool second = t + 1 < count;
      const float w0 = __shfl_sync(0xffffffffu, w_lane, t);
      const float w1 = __shfl_sync(0xffffffffu, w_lane, second ? t + 1 : t);
      const float* src0 = p.ws_out + (static_cast<int64_t>(s0 + t) * p.rows_total + row) * p.D;
      const float* src1 = second ? src0 + p.rows_total * p.D : src0;
#pragma unroll
      for (int u = 0; u < kMergeVecs; ++u) {
        const int d = 4 * (lane + 32 * u);
        if (d < p.D) {
          const float4 x0 = *reinterpret_cast<const float4*>(src0 + d);
          const float4 x1 = *reinterpret_cast<const float4*>(src1 + d);
          add_weighted(acc[u], w0, x0);
          if (second) add_weighted(acc[u], w1, x1);
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  const bool empty = wsum == 0.f;  // no visible key at all: out 0, lse -inf
  const float inv = empty ? 0.f : 1.f / wsum;
  T* o = reinterpret_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
#pragma unroll
  for (int u = 0; u < kMergeVecs; ++u) {
    const int d = 4 * (lane + 32 * u);
    if (d < p.D) {
      o[(d + 0) * p.so[3]] = from_float<T>(acc[u].x * inv);
      o[(d + 1) * p.so[3]] = from_float<T>(acc[u].y * inv);
      o[(d + 2) * p.so[3]] = from_float<T>(acc[u].z * inv);
      o[(d + 3) * p.so[3]] = from_float<T>(acc[u].w * inv);
    }
  }
  if (lane == 0) p.lse[row] = empty ? -INFINITY : (m_use + log2f(wsum)) * kLn2;
}

}  // namespace spd
