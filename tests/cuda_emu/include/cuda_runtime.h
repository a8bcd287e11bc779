// Host emulation of the CUDA features csrc/shared_prefix_decode.{cu,cuh} use: tests only.
//
// The decode kernels have never run on a GPU (none was lent while they were written). This header
// stands in for cuda_runtime.h, cuda_fp16.h and cuda_bf16.h when the same sources are compiled
// by g++ with -DSPD_EMULATE, so their logic runs on the CPU: one std::thread per CUDA thread of a
// block (blocks run one after another on the same threads), __syncthreads and __syncwarp as std::barrier, warp shuffles
// and mma.sync m16n8k16 / ldmatrix as exchanges through per-warp buffers (fragment layouts as in the PTX ISA),
// cp.async as an immediate 16-byte copy. It checks what the kernels compute (indexing, masks,
// online softmax, splits, merge), not timing, memory ordering or races.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct __attribute__((aligned(8))) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchOutOfResources = 7 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
typedef struct CUstream_st* cudaStream_t;

// ---------------------------------------------------------------- 16-bit types (storage only)

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline float spd_emu_half_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if (std::isnan(f)) {
    r.bits = 0x7fc0;
  } else {
    r.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
  }
  return r;
}
inline float spd_emu_bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---------------------------------------------------------------- threads, blocks, barriers

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace spd_emu {

inline int sm_count = 132;  // what cudaDeviceGetAttribute reports (an H100's)
inline cudaError_t last_error = cudaSuccess;
constexpr size_t kSharedBytes = 228 * 1024;  // an H100's shared memory per multiprocessor

struct Block {
  explicit Block(int threads) : all(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    exchange.resize(warps.size());
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<uint32_t, 32 * 6>> exchange;  // per warp: one value (shuffle) or 6 registers (mma) a lane
};
inline thread_local Block* block = nullptr;

inline void warp_sync() { block->warps[threadIdx.x >> 5]->arrive_and_wait(); }

}  // namespace spd_emu

inline void __syncthreads() { spd_emu::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { spd_emu::warp_sync(); }

namespace spd_emu {
// Every lane publishes v, then reads the value of lane `src` (a lane of the same warp).
template <typename V>
inline V shuffle(V v, int src) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  auto& buf = block->exchange[threadIdx.x >> 5];
  std::memcpy(&buf[threadIdx.x & 31], &v, 4);
  warp_sync();
  V r;
  std::memcpy(&r, &buf[src & 31], 4);
  warp_sync();
  return r;
}
}  // namespace spd_emu

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  return spd_emu::shuffle(v, static_cast<int>(threadIdx.x & 31) ^ lane_mask);
}

template <typename V>
inline V __shfl_sync(unsigned, V v, int src_lane) {
  return spd_emu::shuffle(v, src_lane);
}

// atomicAdd on global memory; within one emulated block the threads are real threads.
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for one warp: lane l gives the address of row
// l % 8 of matrix l / 8; r[i] gets matrix i's elements (l / 4, 2 (l % 4) + e), e = 0, 1, or with
// trans (2 (l % 4) + e, l / 4), e = 0 in bits 0-15.
inline void spd_emu_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  auto& buf = spd_emu::block->exchange[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  std::memcpy(&buf[lane * 6], &row, sizeof(row));
  spd_emu::warp_sync();
  for (int i = 0; i < 4; ++i) {
    uint32_t word = 0;
    for (int e = 0; e < 2; ++e) {
      const int rr = trans ? 2 * (lane % 4) + e : lane / 4;
      const int cc = trans ? lane / 4 : 2 * (lane % 4) + e;
      const unsigned char* base;
      std::memcpy(&base, &buf[(8 * i + rr) * 6], sizeof(base));
      uint16_t x;
      std::memcpy(&x, base + 2 * cc, 2);
      word |= static_cast<uint32_t>(x) << (16 * e);
    }
    r[i] = word;
  }
  spd_emu::warp_sync();
}

// d (16x8) += a (16x16, row-major) * b (16x8, column-major) for one warp, from each lane's
// registers: lane = 4 * gid + tig holds a0 = A[gid][2tig..2tig+1], a1 = A[gid+8][2tig..],
// a2 = A[gid][2tig+8..], a3 = A[gid+8][2tig+8..], b0 = B[2tig..2tig+1][gid], b1 = B[2tig+8..][gid],
// d = D[gid][2tig], D[gid][2tig+1], D[gid+8][2tig], D[gid+8][2tig+1]; the lower column (or row
// of B) of a pair in bits 0-15. Products are summed in fp32.
template <float (*TO_FLOAT)(uint16_t)>
inline void spd_emu_mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
  auto& buf = spd_emu::block->exchange[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  const uint32_t regs[6] = {a0, a1, a2, a3, b0, b1};
  for (int i = 0; i < 6; ++i) buf[lane * 6 + i] = regs[i];
  spd_emu::warp_sync();
  auto half_of = [](uint32_t reg, int upper) { return TO_FLOAT(static_cast<uint16_t>(upper ? reg >> 16 : reg)); };
  auto A = [&](int r, int c) {
    const int owner = 4 * (r % 8) + (c % 8) / 2;
    const int reg = (r >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0);
    return half_of(buf[owner * 6 + reg], c % 2);
  };
  auto B = [&](int k, int n) {
    const int owner = 4 * n + (k % 8) / 2;
    return half_of(buf[owner * 6 + 4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  const int gid = lane >> 2, tig = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = gid + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[i] += sum;
  }
  spd_emu::warp_sync();
}

inline void spd_emu_cp_async16(void* smem, const void* gmem, bool full) {
  if (full) {
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}

// ---------------------------------------------------------------- runtime API

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= static_cast<int>(spd_emu::kSharedBytes) ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = spd_emu::last_error;
  spd_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : (e == cudaErrorLaunchOutOfResources ? "too many threads or too much shared memory" : "invalid value");
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = spd_emu::sm_count;
  return cudaSuccess;
}

namespace spd_emu {

// kernel<<<grid, threads, smem>>>(p): every block in turn, one std::thread per CUDA thread (the
// same threads for every block). A thread that returns early drops out of its block's barriers,
// as it stops counting on a GPU; a fresh Block is made for the next block once all have finished.
template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 threads, size_t smem, const P& p) {
  if (threads.x * threads.y * threads.z > 1024 || smem > kSharedBytes || threads.y != 1 || threads.z != 1) {
    last_error = cudaErrorLaunchOutOfResources;
    return;
  }
  gridDim = grid;
  blockDim = threads;
  const int n = static_cast<int>(threads.x);
  auto current = std::make_unique<Block>(n);
  std::barrier<> between(n);
  auto worker = [&](int t) {
    threadIdx = dim3(t);
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          block = current.get();
          kernel(p);
          block->warps[t >> 5]->arrive_and_drop();
          block->all.arrive_and_drop();
          between.arrive_and_wait();
          if (t == 0) current = std::make_unique<Block>(n);
          between.arrive_and_wait();
        }
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (int t = 0; t < n; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
}

}  // namespace spd_emu

// The dynamic shared memory of the block being run (`extern __shared__ unsigned char smem[]` in
// the kernels, which live in namespace spd); blocks run one at a time.
namespace spd {
alignas(16) unsigned char smem[spd_emu::kSharedBytes];
}
