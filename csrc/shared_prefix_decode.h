/*
 * Shared-prefix decode attention: the C launcher API (torch-free, CUDA-header-free).
 *
 * Semantics (same as prefix_kernels.shared_prefix_attention, decode case): request b's query rows
 * attend to cat(prefix_k[g], k[b]), g = prefix_index[b], with prefix key j visible iff
 * prefix_mask[g, j] (when given; every query row alike) and own key j visible iff kv_mask[b, j]
 * (when given) and, when causal, j <= i + (T - Lq) (bottom-right). Query head h reads kv head
 * h / (Hq / Hkv). out is written in q's dtype, lse (natural log) in float32; a row with no
 * visible key gets out = 0 and lse = -inf. A key masked by either mask is never read (its K and
 * V may hold anything, NaN included).
 *
 * Calling sequence (see torch_binding.cpp):
 *   1. spd_unsupported(dtype, D, Lq)       NULL, or why these kernels cannot take the case
 *   2. spd_make_plan(&problem, sms, &plan)  splits, grid sizes, rows per block, workspace sizes
 *   3. allocate the workspace (plan.ws_*_elems floats, plan.group_ws_elems int32)
 *   4. spd_launch(&args, &plan, stream)     the kernels on `stream`, no host synchronisation: the
 *                                           grouping of requests by prefix (when prefix_index is
 *                                           given), the prefix and per-request parts (one launch
 *                                           with fuse_parts), the merge
 *
 * All strides are in elements and 64-bit. Sizes must fit in int32 (checked by spd_make_plan).
 */
#ifndef PREFIX_KERNELS_SHARED_PREFIX_DECODE_H_
#define PREFIX_KERNELS_SHARED_PREFIX_DECODE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SPD_FLOAT16 = 0, SPD_BFLOAT16 = 1, SPD_FLOAT32 = 2 } spd_dtype;

/* Query rows per decode step are at most this many (Lq in 1..SPD_MAX_LQ). */
#define SPD_MAX_LQ 16

/* The sizes of one call. */
typedef struct {
  spd_dtype dtype;
  int64_t B;    /* requests */
  int64_t Hq;   /* query heads */
  int64_t Hkv;  /* kv heads; Hq % Hkv == 0 */
  int64_t Lq;   /* query rows per request, 1..SPD_MAX_LQ */
  int64_t T;    /* own keys per request (k, v), >= 0 */
  int64_t D;    /* head dim */
  int64_t G;    /* prefixes, >= 1 */
  int64_t P;    /* keys per prefix, >= 0 */
} spd_problem;

/* How one call is cut into blocks; filled by spd_make_plan. */
typedef struct {
  int64_t rows_per_block;     /* stacked query rows per block (16 per warp) */
  int64_t keys_per_tile;      /* keys staged in shared memory per step */
  int64_t group_rows;         /* (Hq / Hkv) * Lq: the rows of one (request, kv head) */
  int64_t prefix_splits;      /* blocks along P per row block (0 when P == 0) */
  int64_t prefix_chunk;       /* keys per prefix split (a multiple of keys_per_tile) */
  int64_t prefix_grid_x;      /* upper bound of the prefix kernel's row blocks over all prefixes */
  int64_t request_splits;     /* blocks along T per (request, kv head, row block) (0 when T == 0) */
  int64_t request_chunk;      /* keys per request split (a multiple of keys_per_tile) */
  int64_t request_row_blocks; /* ceil(group_rows / rows_per_block) */
  int64_t rows_total;         /* B * Hq * Lq */
  int64_t ws_out_elems;       /* float32 elements of the partial-output workspace */
  int64_t ws_lse_elems;       /* float32 elements of the partial-lse workspace */
  int64_t smem_bytes;         /* dynamic shared memory of the attention kernels */
  int64_t group_ws_elems;     /* int32 elements of the grouping workspace (args.group_ws) */
} spd_plan;

/* Device pointers and strides of one call. */
typedef struct {
  const void* q;  int64_t q_stride[4];   /* (B, Hq, Lq, D) */
  const void* k;  int64_t k_stride[4];   /* (B, Hkv, T, D) */
  const void* v;  int64_t v_stride[4];   /* (B, Hkv, T, D) */
  const void* pk; int64_t pk_stride[4];  /* (G, Hkv, P, D) */
  const void* pv; int64_t pv_stride[4];  /* (G, Hkv, P, D) */
  const uint8_t* kv_mask;                /* (B, T), nonzero = may attend; NULL: all */
  int64_t kv_mask_stride[2];
  void* out;      int64_t out_stride[4]; /* (B, Hq, Lq, D), q's dtype */
  float* lse;                            /* (B, Hq, Lq) contiguous, natural log */
  /* Requests grouped by prefix (int32, on the device), optional:
   *   order[starts[g] .. starts[g+1])  the requests that use prefix g        order (B,), starts (G+1,)
   *   block_starts[g]                  sum over g' < g of ceil(count(g') * group_rows / rows_per_block)
   *                                    (G+1,); block_starts[G] is the number of prefix row blocks.
   * NULL (the usual call): spd_launch groups the requests itself, from prefix_index (below) with
   * one small kernel into group_ws, or, without prefix_index, knows that every request uses
   * prefix 0 and needs no table at all. */
  const int32_t* order;
  const int32_t* starts;
  const int32_t* block_starts;
  float* ws_out;  /* plan.ws_out_elems floats (may be NULL when 0) */
  float* ws_lse;  /* plan.ws_lse_elems floats (may be NULL when 0) */
  int causal;
  float scale;    /* multiplies q . k (natural units) */
  int fuse_parts; /* nonzero: the prefix and per-request kernels as one launch, blocks interleaved
                     (parts_kernel); same partials, same result. The Python side decides it
                     per call (prefix_kernels._core.config.fuse_parts). */
  const uint8_t* prefix_mask;            /* (G, P), nonzero = may attend; NULL: every prefix key */
  int64_t prefix_mask_stride[2];         /* its row (per prefix) and key strides */
  /* Used when order is NULL. prefix_index (B,) int32 or int64 on the device, values in [0, G)
   * (not checked here: that would sync the host; a request with another value gets no prefix
   * part), or NULL: prefix 0 for every request. group_ws: plan.group_ws_elems int32 that the
   * grouping kernel fills (order, starts, block_starts, and a counter per prefix). */
  const void* prefix_index;
  int prefix_index_is_int64;
  int64_t prefix_index_stride;
  int32_t* group_ws;
} spd_args;

/* NULL when (dtype, D, Lq) is supported, else a static sentence saying why not. */
const char* spd_unsupported(spd_dtype dtype, int64_t D, int64_t Lq);

/* Fills *plan for `num_sms` multiprocessors. Returns NULL on success, else a static reason. */
const char* spd_make_plan(const spd_problem* problem, int num_sms, spd_plan* plan);

/* Multiprocessor count of `device` (cudaDevAttrMultiProcessorCount), or -1 on error. */
int spd_device_sm_count(int device);

/* Launches the prefix, per-request and merge kernels on `stream` (a cudaStream_t).
 * Returns 0 (cudaSuccess) or the CUDA error code; spd_error_string names it. */
int spd_launch(const spd_problem* problem, const spd_plan* plan, const spd_args* args, void* stream);

const char* spd_error_string(int error);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* PREFIX_KERNELS_SHARED_PREFIX_DECODE_H_ */
