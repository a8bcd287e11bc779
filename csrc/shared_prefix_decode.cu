// Shared-prefix decode attention: plan, dispatch over (dtype, head dim) and launches (torch-free).
#include "shared_prefix_decode.h"

#include <limits.h>

#include "shared_prefix_decode.cuh"

// kernel<<<grid, threads, smem, stream>>>(p); the host emulation (tests/cuda_emu) runs the same
// launch on CPU threads. The kernel comes last: its template arguments contain a comma.
#ifdef SPD_EMULATE
#define SPD_LAUNCH(grid, threads, smem, stream, p, ...) spd_emu::launch(__VA_ARGS__, grid, threads, smem, p)
#else
#define SPD_LAUNCH(grid, threads, smem, stream, p, ...) __VA_ARGS__<<<grid, threads, smem, stream>>>(p)
#endif

namespace spd {
namespace {

// The head dims compiled; every other D is declined (the dispatcher falls back to Triton).
#define SPD_FOR_EACH_HEAD_DIM(X) X(64) X(80) X(96) X(128) X(256)

constexpr int64_t kMaxGridY = 65535;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool head_dim_compiled(int64_t D) {
#define SPD_CASE(d) if (D == d) return true;
  SPD_FOR_EACH_HEAD_DIM(SPD_CASE)
#undef SPD_CASE
  return false;
}

struct Shape {
  int rows, keys, smem;
};

template <typename T>
bool shape_of(int64_t D, Shape* s) {
#define SPD_CASE(d)                                                                   \
  if (D == d) {                                                                       \
    *s = Shape{Config<T, d>::ROWS, Config<T, d>::N, Config<T, d>::SMEM};              \
    return true;                                                                      \
  }
  SPD_FOR_EACH_HEAD_DIM(SPD_CASE)
#undef SPD_CASE
  return false;
}

bool shape_of(spd_dtype dtype, int64_t D, Shape* s) {
  switch (dtype) {
    case SPD_FLOAT16: return shape_of<__half>(D, s);
    case SPD_BFLOAT16: return shape_of<__nv_bfloat16>(D, s);
    case SPD_FLOAT32: return shape_of<float>(D, s);
  }
  return false;
}

// Splits of a segment of `keys` keys so that about `target` blocks run when `base` blocks exist
// without splitting, and at most `cap`; every split holds at least one tile and the same number
// of tiles.
void split_keys(int64_t keys, int64_t tile, int64_t base, int64_t target, int64_t cap, int64_t* splits,
                int64_t* chunk) {
  if (keys <= 0) {
    *splits = 0;
    *chunk = tile;
    return;
  }
  const int64_t tiles = cdiv(keys, tile);
  int64_t want = cdiv(target, base > 0 ? base : 1);
  if (want < 1) want = 1;
  if (want > tiles) want = tiles;
  if (want > cap) want = cap;
  if (want > kMaxGridY) want = kMaxGridY;
  *chunk = cdiv(tiles, want) * tile;
  *splits = cdiv(keys, *chunk);
}

// 16-byte copies need 16-byte-aligned rows of unit column stride.
bool vec_ok(const void* ptr, const int64_t* stride, int ndim, int elem_bytes) {
  const int64_t vec = 16 / elem_bytes;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  if (stride[ndim - 1] != 1) return false;
  for (int i = 0; i < ndim - 1; ++i) {
    if (stride[i] % vec != 0) return false;
  }
  return true;
}

// The prefix and per-request kernels as two launches.
template <typename T, int D>
cudaError_t launch_parts(const Params& p, cudaStream_t stream) {
  using C = Config<T, D>;
  cudaError_t err;
  if (p.prefix_splits > 0) {
    err = cudaFuncSetAttribute(prefix_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(p.prefix_grid_x), static_cast<unsigned>(p.Hkv),
                    static_cast<unsigned>(p.prefix_splits));
    SPD_LAUNCH(grid, C::THREADS, C::SMEM, stream, p, prefix_kernel<T, D>);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.request_splits > 0) {
    err = cudaFuncSetAttribute(request_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Hkv * p.request_row_blocks),
                    static_cast<unsigned>(p.request_splits));
    SPD_LAUNCH(grid, C::THREADS, C::SMEM, stream, p, request_kernel<T, D>);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_typed(const Params& p, cudaStream_t stream, bool fuse_parts) {
  using C = Config<T, D>;
  cudaError_t err;
  const int64_t n_prefix = p.prefix_grid_x * p.Hkv * p.prefix_splits;
  const int64_t n_request = static_cast<int64_t>(p.B) * p.Hkv * p.request_row_blocks * p.request_splits;
  // One grid when asked for, both parts have blocks, and their sum fits gridDim.x (else two launches).
  if (fuse_parts && n_prefix > 0 && n_request > 0 && n_prefix + n_request <= INT_MAX) {
    err = cudaFuncSetAttribute(parts_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) return err;
    SPD_LAUNCH(dim3(static_cast<unsigned>(n_prefix + n_request)), C::THREADS, C::SMEM, stream, p,
               parts_kernel<T, D>);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  } else {
    err = launch_parts<T, D>(p, stream);
    if (err != cudaSuccess) return err;
  }
  const unsigned merge_blocks = static_cast<unsigned>(cdiv(p.rows_total, kMergeWarps));
  SPD_LAUNCH(merge_blocks, 32 * kMergeWarps, 0, stream, p, merge_kernel<T>);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const Params& p, cudaStream_t stream, bool fuse_parts) {
#define SPD_CASE(d) \
  if (p.D == d) return launch_typed<T, d>(p, stream, fuse_parts);
  SPD_FOR_EACH_HEAD_DIM(SPD_CASE)
#undef SPD_CASE
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace spd

extern "C" const char* spd_unsupported(spd_dtype dtype, int64_t D, int64_t Lq) {
  if (dtype != SPD_FLOAT16 && dtype != SPD_BFLOAT16 && dtype != SPD_FLOAT32) {
    return "dtype is not float16, bfloat16 or float32";
  }
  if (!spd::head_dim_compiled(D)) return "head dim is not one of the compiled 64, 80, 96, 128, 256";
  if (Lq < 1 || Lq > SPD_MAX_LQ) return "Lq (query rows per request) must be in 1..16 for the decode kernels";
  return nullptr;
}

extern "C" const char* spd_make_plan(const spd_problem* pr, int num_sms, spd_plan* plan) {
  const char* why = spd_unsupported(pr->dtype, pr->D, pr->Lq);
  if (why != nullptr) return why;
  if (pr->B < 1 || pr->Hq < 1 || pr->Hkv < 1 || pr->G < 1 || pr->T < 0 || pr->P < 0) {
    return "sizes must be B, Hq, Hkv, G >= 1 and T, P >= 0";
  }
  if (pr->Hq % pr->Hkv != 0) return "Hq must be a multiple of Hkv";
  if (pr->Hkv > spd::kMaxGridY) return "more than 65535 kv heads";
  const int64_t rows_total = pr->B * pr->Hq * pr->Lq;
  if (rows_total > INT_MAX || pr->T > INT_MAX - 64 || pr->P > INT_MAX - 64 || pr->G > INT_MAX - 1) {
    return "sizes exceed the 32-bit range of the decode kernels";
  }
  spd::Shape s;
  if (!spd::shape_of(pr->dtype, pr->D, &s)) return "head dim is not compiled";
  if (num_sms < 1) num_sms = 1;

  plan->rows_per_block = s.rows;
  plan->keys_per_tile = s.keys;
  plan->smem_bytes = s.smem;
  plan->group_rows = (pr->Hq / pr->Hkv) * pr->Lq;
  plan->rows_total = rows_total;
  // Two waves of blocks for each attention kernel (several blocks fit on one multiprocessor).
  const int64_t target = 2 * static_cast<int64_t>(num_sms);

  // Prefix: every request's group_rows rows of a kv head, stacked per prefix and cut into blocks;
  // prefix g needs ceil(count_g * group_rows / rows) blocks, at most B * group_rows / rows + min(G, B).
  const int64_t prefix_row_blocks = spd::cdiv(pr->B * plan->group_rows, s.rows);
  plan->prefix_grid_x = prefix_row_blocks + (pr->G < pr->B ? pr->G : pr->B);
  // Split partials: every split's fp32 rows (D values and an lse), written then read back by the
  // merge, together within a tenth of the bytes the step reads (the caches once, q and out),
  // shared between the parts by their keys; each part may always take one split. More splits
  // fill more multiprocessors but move more bytes, and a decode step is bound by its bytes.
  const int64_t elem = pr->dtype == SPD_FLOAT32 ? 4 : 2;
  const int64_t prefixes = pr->G < pr->B ? pr->G : pr->B;
  const int64_t step_bytes = 2 * (prefixes * pr->Hkv * pr->P + pr->B * pr->Hkv * pr->T) * pr->D * elem +
                             2 * rows_total * pr->D * elem;
  const int64_t per_split = 2 * rows_total * (pr->D + 1) * 4;
  const int64_t budget = step_bytes / 10 / per_split;
  const int64_t keys = pr->P + pr->T > 0 ? pr->P + pr->T : 1;
  const int64_t prefix_cap = budget * pr->P / keys > 1 ? budget * pr->P / keys : 1;
  const int64_t request_cap = budget * pr->T / keys > 1 ? budget * pr->T / keys : 1;
  spd::split_keys(pr->P, s.keys, prefix_row_blocks * pr->Hkv, target, prefix_cap, &plan->prefix_splits,
                  &plan->prefix_chunk);

  plan->request_row_blocks = spd::cdiv(plan->group_rows, s.rows);
  spd::split_keys(pr->T, s.keys, pr->B * pr->Hkv * plan->request_row_blocks, target, request_cap,
                  &plan->request_splits, &plan->request_chunk);

  if (plan->prefix_grid_x > INT_MAX || pr->B * pr->Hkv * plan->request_row_blocks > INT_MAX ||
      spd::cdiv(rows_total, spd::kMergeWarps) > INT_MAX) {
    return "too many blocks for one grid";
  }
  const int64_t n_splits = plan->prefix_splits + plan->request_splits;
  plan->ws_lse_elems = n_splits * rows_total;
  plan->ws_out_elems = plan->ws_lse_elems * pr->D;
  plan->group_ws_elems = pr->B + 2 * (pr->G + 1) + pr->G;  // order, starts, block_starts, counters
  return nullptr;
}

extern "C" int spd_device_sm_count(int device) {
  int n = -1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return -1;
  return n;
}

extern "C" const char* spd_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

extern "C" int spd_launch(const spd_problem* pr, const spd_plan* plan, const spd_args* a, void* stream) {
  if (spd_unsupported(pr->dtype, pr->D, pr->Lq) != nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int elem = pr->dtype == SPD_FLOAT32 ? 4 : 2;
  spd::Params p;
  p.q = a->q;
  p.k = a->k;
  p.v = a->v;
  p.pk = a->pk;
  p.pv = a->pv;
  p.mask = a->kv_mask;
  p.pmask = a->prefix_mask;
  p.out = a->out;
  p.lse = a->lse;
  // Tables of requests by prefix: the caller's; else built by group_kernel from prefix_index;
  // else none (every request on prefix 0: the prefix grid is exactly its row blocks).
  p.order = a->order;
  p.starts = a->starts;
  p.block_starts = a->block_starts;
  p.pidx = a->prefix_index;
  p.pidx_stride = a->prefix_index_stride;
  p.pidx64 = a->prefix_index_is_int64 != 0;
  p.group_ws = a->group_ws;
  p.rows_per_block = static_cast<int>(plan->rows_per_block);
  const bool group_on_device = a->order == nullptr && a->prefix_index != nullptr;
  if (group_on_device) {
    if (a->group_ws == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    p.order = a->group_ws;
    p.starts = a->group_ws + pr->B;
    p.block_starts = p.starts + pr->G + 1;
  }
  p.ws_out = a->ws_out;
  p.ws_lse = a->ws_lse;
  for (int i = 0; i < 4; ++i) {
    p.sq[i] = a->q_stride[i];
    p.sk[i] = a->k_stride[i];
    p.sv[i] = a->v_stride[i];
    p.spk[i] = a->pk_stride[i];
    p.spv[i] = a->pv_stride[i];
    p.so[i] = a->out_stride[i];
  }
  p.sm_b = a->kv_mask_stride[0];
  p.sm_n = a->kv_mask_stride[1];
  p.spm_g = a->prefix_mask_stride[0];
  p.spm_n = a->prefix_mask_stride[1];
  p.rows_total = plan->rows_total;
  p.B = static_cast<int>(pr->B);
  p.Hq = static_cast<int>(pr->Hq);
  p.Hkv = static_cast<int>(pr->Hkv);
  p.Lq = static_cast<int>(pr->Lq);
  p.T = static_cast<int>(pr->T);
  p.G = static_cast<int>(pr->G);
  p.P = static_cast<int>(pr->P);
  p.D = static_cast<int>(pr->D);
  p.group = static_cast<int>(pr->Hq / pr->Hkv);
  p.group_rows = static_cast<int>(plan->group_rows);
  p.prefix_splits = static_cast<int>(plan->prefix_splits);
  p.prefix_chunk = static_cast<int>(plan->prefix_chunk);
  p.request_splits = static_cast<int>(plan->request_splits);
  p.request_chunk = static_cast<int>(plan->request_chunk);
  p.request_row_blocks = static_cast<int>(plan->request_row_blocks);
  p.n_splits = p.prefix_splits + p.request_splits;
  p.prefix_grid_x = p.order != nullptr ? plan->prefix_grid_x : spd::cdiv(pr->B * plan->group_rows, plan->rows_per_block);
  p.causal = a->causal != 0;
  p.vec_q = spd::vec_ok(a->q, a->q_stride, 4, elem);
  p.vec_kv = spd::vec_ok(a->k, a->k_stride, 4, elem) && spd::vec_ok(a->v, a->v_stride, 4, elem);
  p.vec_p = spd::vec_ok(a->pk, a->pk_stride, 4, elem) && spd::vec_ok(a->pv, a->pv_stride, 4, elem);
  p.qk_scale = a->scale * 1.4426950408889634f;  // log2(e): scores in log2 units, exp2 in the kernels

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (group_on_device && plan->prefix_splits > 0) {  // only the prefix part reads the tables
    SPD_LAUNCH(dim3(1), spd::kGroupThreads, spd::kGroupSmem, s, p, spd::group_kernel);
    const cudaError_t group_err = cudaGetLastError();
    if (group_err != cudaSuccess) return static_cast<int>(group_err);
  }
  cudaError_t err = cudaErrorInvalidValue;
  switch (pr->dtype) {
    case SPD_FLOAT16: err = spd::launch_dim<__half>(p, s, a->fuse_parts != 0); break;
    case SPD_BFLOAT16: err = spd::launch_dim<__nv_bfloat16>(p, s, a->fuse_parts != 0); break;
    case SPD_FLOAT32: err = spd::launch_dim<float>(p, s, a->fuse_parts != 0); break;
  }
  return static_cast<int>(err);
}
