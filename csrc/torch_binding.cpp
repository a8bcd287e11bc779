// torch binding of the shared-prefix decode kernels: checks, allocation and the op registration
// (the grouping of requests by prefix happens inside spd_launch, on the device)
//   torch.ops.prefix_kernels_cuda.decode(q, k, v, pk, pv, prefix_index?, kv_mask?, causal, scale,
//                                        fuse_parts=False, prefix_mask=None)
//       -> (out, lse)
// The only file of csrc/ that includes torch headers. Only c10/cuda headers are used for the
// device guard and the current stream (not ATen/cuda/CUDAContext.h, which pulls in cuSPARSE and
// cuBLAS headers), so that this file also compiles against a CPU wheel's headers for CI.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "shared_prefix_decode.h"

namespace {

spd_dtype to_spd_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return SPD_FLOAT16;
    case at::kBFloat16: return SPD_BFLOAT16;
    case at::kFloat: return SPD_FLOAT32;
    default: TORCH_CHECK(false, "prefix_kernels_cuda.decode: dtype ", t, " is not float16, bfloat16 or float32");
  }
  return SPD_FLOAT32;  // not reached
}

// Strides of x in elements; a dimension of size 1 is never stepped, so its stride is set to 0
// (torch gives such dimensions arbitrary strides, which would needlessly rule out 16-byte copies).
void strides_of(const at::Tensor& x, int64_t* out) {
  for (int64_t i = 0; i < x.dim(); ++i) out[i] = x.size(i) == 1 ? 0 : x.stride(i);
}

// An optional (rows, cols) bool/uint8 mask on q's device, viewed as uint8 (bool is one byte).
at::Tensor mask_bytes(const std::optional<at::Tensor>& mask, const char* name, const at::Tensor& q, int64_t rows,
                      int64_t cols) {
  if (!mask.has_value()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == q.device(), "prefix_kernels_cuda.decode: ", name, " is on ", m.device(), ", q on ",
              q.device());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, "prefix_kernels_cuda.decode: ", name,
              " must be bool or uint8, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == cols, "prefix_kernels_cuda.decode: ", name,
              " must have shape (", rows, ", ", cols, "), got ", m.sizes());
  return m.scalar_type() == at::kBool ? m.view(at::kByte) : m;
}

// Multiprocessor count of a device, queried once per device and process: the plan needs it on
// every call, and a decode step should make no device queries (it may be captured in a graph).
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  if (device < 0 || device >= static_cast<int>(cache.size())) return spd_device_sm_count(device);
  int n = cache[device].load(std::memory_order_relaxed);
  if (n <= 0) {
    n = spd_device_sm_count(device);
    if (n > 0) cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

void check_4d(const at::Tensor& x, const char* name, const at::Tensor& q, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(x.is_cuda(), "prefix_kernels_cuda.decode: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == q.device(), "prefix_kernels_cuda.decode: ", name, " is on ", x.device(), ", q on ",
              q.device());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "prefix_kernels_cuda.decode: ", name, " has dtype ",
              x.scalar_type(), ", q has ", q.scalar_type());
  TORCH_CHECK(x.sizes().equals(shape), "prefix_kernels_cuda.decode: ", name, " has shape ", x.sizes(),
              ", expected ", at::IntArrayRef(shape));
}

std::tuple<at::Tensor, at::Tensor> decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& pk, const at::Tensor& pv,
                                          const std::optional<at::Tensor>& prefix_index,
                                          const std::optional<at::Tensor>& kv_mask, bool causal, double scale,
                                          bool fuse_parts, const std::optional<at::Tensor>& prefix_mask) {
  TORCH_CHECK(q.is_cuda(), "prefix_kernels_cuda.decode: q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && pk.dim() == 4 && pv.dim() == 4,
              "prefix_kernels_cuda.decode: q, k, v, prefix_k, prefix_v must be 4-D");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2);
  const int64_t G = pk.size(0), P = pk.size(2);
  check_4d(k, "k", q, {B, Hkv, T, D});
  check_4d(v, "v", q, {B, Hkv, T, D});
  check_4d(pk, "prefix_k", q, {G, Hkv, P, D});
  check_4d(pv, "prefix_v", q, {G, Hkv, P, D});
  const spd_dtype dtype = to_spd_dtype(q.scalar_type());
  const char* why = spd_unsupported(dtype, D, Lq);
  TORCH_CHECK(why == nullptr, "prefix_kernels_cuda.decode: ", why);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "prefix_kernels_cuda.decode: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(G >= 1, "prefix_kernels_cuda.decode: prefix_k must hold at least one prefix");
  if (prefix_index.has_value()) {
    const at::Tensor& pi = *prefix_index;
    TORCH_CHECK(pi.device() == q.device(), "prefix_kernels_cuda.decode: prefix_index is on ", pi.device());
    TORCH_CHECK(pi.scalar_type() == at::kInt || pi.scalar_type() == at::kLong,
                "prefix_kernels_cuda.decode: prefix_index must be int32 or int64, got ", pi.scalar_type());
    TORCH_CHECK(pi.dim() == 1 && pi.size(0) == B, "prefix_kernels_cuda.decode: prefix_index must have shape (", B,
                ",), got ", pi.sizes());
  }
  const at::Tensor mask = mask_bytes(kv_mask, "kv_mask", q, B, T);
  const at::Tensor pmask = mask_bytes(prefix_mask, "prefix_mask", q, G, P);

  const c10::cuda::CUDAGuard guard(q.device());
  // Output memory is (B, Lq, Hq, D), returned as its (B, Hq, Lq, D) view (prefix_kernels.ops.out_layout).
  at::Tensor out = at::empty({B, Lq, Hq, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0) return {out, lse};

  const spd_problem problem{dtype, B, Hq, Hkv, Lq, T, D, G, P};
  spd_plan plan;
  const int sms = sm_count(q.get_device());
  why = spd_make_plan(&problem, sms, &plan);
  TORCH_CHECK(why == nullptr, "prefix_kernels_cuda.decode: ", why);

  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor ws_out = at::empty({plan.ws_out_elems > 0 ? plan.ws_out_elems : 1}, f32);
  at::Tensor ws_lse = at::empty({plan.ws_lse_elems > 0 ? plan.ws_lse_elems : 1}, f32);
  // The requests are grouped by prefix inside spd_launch (one small kernel into group_ws; none
  // without prefix_index): no sort or table ops here, nothing that could sync the host, and a
  // step that a CUDA graph can capture. The values must lie in [0, G): the public op checks them.
  at::Tensor group_ws;
  if (prefix_index.has_value()) group_ws = at::empty({plan.group_ws_elems}, q.options().dtype(at::kInt));

  spd_args args{};
  args.q = q.data_ptr();
  strides_of(q, args.q_stride);
  args.k = k.data_ptr();
  strides_of(k, args.k_stride);
  args.v = v.data_ptr();
  strides_of(v, args.v_stride);
  args.pk = pk.data_ptr();
  strides_of(pk, args.pk_stride);
  args.pv = pv.data_ptr();
  strides_of(pv, args.pv_stride);
  if (mask.defined()) {
    args.kv_mask = static_cast<const uint8_t*>(mask.data_ptr());
    strides_of(mask, args.kv_mask_stride);
  }
  args.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) args.out_stride[i] = out.stride(i);
  args.lse = lse.data_ptr<float>();
  args.order = nullptr;  // spd_launch groups the requests (below)
  args.starts = nullptr;
  args.block_starts = nullptr;
  args.ws_out = ws_out.data_ptr<float>();
  args.ws_lse = ws_lse.data_ptr<float>();
  args.causal = causal ? 1 : 0;
  args.scale = static_cast<float>(scale);
  args.fuse_parts = fuse_parts ? 1 : 0;
  if (pmask.defined()) {
    args.prefix_mask = static_cast<const uint8_t*>(pmask.data_ptr());
    strides_of(pmask, args.prefix_mask_stride);
  }
  if (prefix_index.has_value()) {
    args.prefix_index = prefix_index->data_ptr();
    args.prefix_index_is_int64 = prefix_index->scalar_type() == at::kLong ? 1 : 0;
    args.prefix_index_stride = prefix_index->stride(0);
    args.group_ws = group_ws.data_ptr<int32_t>();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  const int err = spd_launch(&problem, &plan, &args, static_cast<void*>(stream));
  TORCH_CHECK(err == 0, "prefix_kernels_cuda.decode: kernel launch failed: ", spd_error_string(err));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(prefix_kernels_cuda, m) {
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor pk, Tensor pv, Tensor? prefix_index, Tensor? kv_mask, "
      "bool causal, float scale, bool fuse_parts=False, Tensor? prefix_mask=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prefix_kernels_cuda, CUDA, m) { m.impl("decode", &decode); }
