// Torch glue of the CUDA thought attention kernels: input checks with clear messages, allocation,
// the current stream, and the registration as the operators qstar_cuda::thought_attention_fwd /
// thought_attention_bwd (CUDA kernels here; fake implementations and autograd in Python, the
// "cuda" attention backend, qstar_kernels/backends/attention/cuda.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/poison.h"
#include "cuda/ops.h"
#include "cuda/thought_attention_cuda.h"

namespace qstar::cuda {
namespace {

PoisonSwitch poisoned;  // the test mode of these ops (set_poison_outputs)

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " must be on ", q.device(),
              " (the device of q), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (call .contiguous())");
  // The kernels read rows in 16-byte vectors (uint4); a misaligned address would fault the context.
  TORCH_CHECK(dtype == at::kBool || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, fn, ": ",
              name, " must start at a 16-byte aligned address (call .clone()), got data_ptr % 16 = ",
              reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16);
}

AttnShape check_common(const char* fn, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const std::optional<at::Tensor>& keep, double scale,
                       int64_t window, bool require_cuda = true) {
  TORCH_CHECK(q.defined(), fn, ": q must be a tensor, got an undefined one");
  TORCH_CHECK(q.is_cuda() || !require_cuda, fn, ": q must be a CUDA tensor, got a tensor on ",
              q.device());
  dtype_of(fn, "q", q);
  TORCH_CHECK(q.dim() == 4, fn, ": q must be 4-D (B, Hq, L, D), got shape ", q.sizes());
  check_tensor(fn, "q", q, q, q.scalar_type());
  check_tensor(fn, "k", k, q, q.scalar_type());
  check_tensor(fn, "v", v, q, q.scalar_type());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), fn,
              ": k and v must be 4-D (B, Hkv, (a+1)*L, D) of one shape, got k ", k.sizes(), " and v ",
              v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B, fn, ": k must have batch size ", B, " (that of q), got ", k.size(0));
  TORCH_CHECK(k.size(3) == D, fn, ": k must have head dim ", D, " (that of q), got ", k.size(3));
  TORCH_CHECK(attention_head_dim_supported(static_cast<int>(D)), fn,
              ": the CUDA kernels support head dims 64 and 128, got D = ", D);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, fn, ": Hq = ", Hq,
              " must be a positive multiple of Hkv = ", Hkv);
  TORCH_CHECK(L >= 1 && Lk >= L && Lk % L == 0, fn,
              ": the key length must be (a+1)*L for an integer a >= 0 with L = ", L, ", got ", Lk);
  TORCH_CHECK(B <= 65535 && Hq <= 65535, fn, ": B and Hq must be at most 65535, got B = ", B,
              ", Hq = ", Hq);
  TORCH_CHECK(Lk * D < (int64_t{1} << 31) && L * Hq < (int64_t{1} << 31), fn,
              ": sequence too long for the kernels' 32-bit row indices");
  TORCH_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  if (keep.has_value() && keep->defined()) {
    const at::Tensor& kp = *keep;
    check_tensor(fn, "keep", kp, q, at::kBool);
    TORCH_CHECK(kp.dim() == 2 && kp.size(0) == B && kp.size(1) == L, fn,
                ": keep must have shape (B, L) = (", B, ", ", L, "), got ", kp.sizes());
  }
  AttnShape s{};
  s.B = static_cast<int>(B);
  s.Hq = static_cast<int>(Hq);
  s.Hkv = static_cast<int>(Hkv);
  s.L = static_cast<int>(L);
  s.D = static_cast<int>(D);
  s.a = static_cast<int>(Lk / L - 1);
  s.window = (window <= 0 || window >= L) ? 0 : static_cast<int>(window);  // >= L: no effect
  s.scale = static_cast<float>(scale);
  return s;
}

const bool* keep_ptr(const std::optional<at::Tensor>& keep) {
  return keep.has_value() && keep->defined() ? keep->data_ptr<bool>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const std::optional<at::Tensor>& keep,
                                       double scale, int64_t window) {
  const char* fn = "qstar_cuda::thought_attention_fwd";
  const AttnShape s = check_common(fn, q, k, v, keep, scale, window);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = poisoned(at::empty_like(q));
  at::Tensor lse =
      poisoned(at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat)));
  AttnFwdArgs args{s, q.data_ptr(), k.data_ptr(), v.data_ptr(), keep_ptr(keep), out.data_ptr(),
                   lse.data_ptr<float>()};
  check_launch(fn, thought_attention_fwd(dtype_of(fn, "q", q), args, current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& keep, double scale, int64_t window) {
  const char* fn = "qstar_cuda::thought_attention_bwd";
  const AttnShape s = check_common(fn, q, k, v, keep, scale, window);
  check_tensor(fn, "grad_out", grad_out, q, q.scalar_type());
  check_tensor(fn, "out", out, q, q.scalar_type());
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), fn,
              ": grad_out and out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  check_tensor(fn, "lse", lse, q, at::kFloat);
  const std::vector<int64_t> row_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(row_shape), fn, ": lse must have shape (B, Hq, L) = ",
              at::IntArrayRef(row_shape), ", got ", lse.sizes());
  const float* glse = nullptr;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_tensor(fn, "grad_lse", *grad_lse, q, at::kFloat);
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), fn, ": grad_lse must have the shape of lse ",
                lse.sizes(), ", got ", grad_lse->sizes());
    glse = grad_lse->data_ptr<float>();
  }
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = poisoned(at::empty_like(q));
  at::Tensor dk = poisoned(at::empty_like(k));
  at::Tensor dv = poisoned(at::empty_like(v));
  at::Tensor delta = poisoned(at::empty_like(lse));
  AttnBwdArgs args{s,
                   q.data_ptr(),
                   k.data_ptr(),
                   v.data_ptr(),
                   keep_ptr(keep),
                   out.data_ptr(),
                   lse.data_ptr<float>(),
                   grad_out.data_ptr(),
                   glse,
                   delta.data_ptr<float>(),
                   dq.data_ptr(),
                   dk.data_ptr(),
                   dv.data_ptr()};
  check_launch(fn, thought_attention_bwd(dtype_of(fn, "q", q), args, current_stream()));
  return {dq, dk, dv};
}

}  // namespace

bool set_poison_outputs(bool on) { return poisoned.set(on); }

std::vector<int64_t> check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& keep, double scale,
                                            int64_t window) {
  const AttnShape s = check_common("qstar_cuda::thought_attention_fwd", q, k, v, keep, scale,
                                   window, /*require_cuda=*/false);
  return {s.B, s.Hq, s.Hkv, s.L, s.D, s.a, s.window};
}

}  // namespace qstar::cuda

// The schemas (the library is defined here; mixing_ops.cpp adds a fragment).
TORCH_LIBRARY(qstar_cuda, m) {
  m.def(
      "thought_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? keep, float scale, int window)"
      " -> (Tensor, Tensor)");
  m.def(
      "thought_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor? keep, float scale, int window) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qstar_cuda, CUDA, m) {
  m.impl("thought_attention_fwd", &qstar::cuda::fwd);
  m.impl("thought_attention_bwd", &qstar::cuda::bwd);
}
