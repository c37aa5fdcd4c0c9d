// Torch glue of the CUDA kernels of mixed_token_logprobs (csrc/cuda/mixing.cu): input checks,
// allocation, the current stream, and the operators qstar_cuda::lm_head_* (CUDA kernels here;
// fakes in Python, in the "cuda" LM-head backend qstar_kernels/backends/lm_head/cuda.py, which runs the
// chunk loop with cuBLAS GEMMs through torch.mm).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/mixing_cuda.h"
#include "cuda/ops.h"

namespace qstar::cuda {
namespace {

void check_cuda(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on ", ref.device(), ", got ",
              t.device());
}

void check_dtype(const char* fn, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, fn, ": ", name, " must have dtype ", want, ", got ",
              t.scalar_type());
}

void check_contiguous(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// A tile: 2-D, unit stride along the columns.
void check_tile(const char* fn, const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 2 && (z.size(1) <= 1 || z.stride(1) == 1) && z.stride(0) >= z.size(1), fn,
              ": z must be a 2-D tile with unit column stride, got shape ", z.sizes(), " strides ",
              z.strides());
}

void check_rows(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                at::ScalarType dtype, const at::Tensor& ref) {
  check_cuda(fn, name, t, ref);
  check_dtype(fn, name, t, dtype);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, fn, ": ", name, " must have shape (", n, ",), got ",
              t.sizes());
  check_contiguous(fn, name, t);
}

void check_mix_inputs(const char* fn, const at::Tensor& h_base, const at::Tensor& h_thought,
                      const at::Tensor& w) {
  check_cuda(fn, "h_base", h_base, h_base);
  dtype_of(fn, "h_base", h_base);
  TORCH_CHECK(h_base.dim() == 2, fn, ": h_base must be 2-D (N, H), got shape ", h_base.sizes());
  check_contiguous(fn, "h_base", h_base);
  check_cuda(fn, "h_thought", h_thought, h_base);
  check_dtype(fn, "h_thought", h_thought, h_base.scalar_type());
  TORCH_CHECK(h_thought.sizes() == h_base.sizes(), fn, ": h_thought must have the shape of h_base ",
              h_base.sizes(), ", got ", h_thought.sizes());
  check_contiguous(fn, "h_thought", h_thought);
  check_rows(fn, "w", w, h_base.size(0), at::kFloat, h_base);
}

at::Tensor mix(const at::Tensor& h_base, const at::Tensor& h_thought, const at::Tensor& w,
               at::ScalarType dtype) {
  const char* fn = "qstar_cuda::lm_head_mix";
  check_mix_inputs(fn, h_base, h_thought, w);
  TORCH_CHECK(dtype == at::kFloat || dtype == h_base.scalar_type(), fn,
              ": dtype must be float32 or the dtype of h_base (", h_base.scalar_type(), "), got ",
              dtype);
  c10::cuda::CUDAGuard guard(h_base.device());
  at::Tensor out = at::empty(h_base.sizes(), h_base.options().dtype(dtype));
  check_launch(fn, lm_head_mix(dtype_of(fn, "h_base", h_base), dtype_of(fn, "dtype", out),
                               h_base.data_ptr(), h_thought.data_ptr(), w.data_ptr<float>(),
                               out.data_ptr(), h_base.size(0), h_base.size(1), current_stream()));
  return out;
}

void lse_merge_(const at::Tensor& z, at::Tensor& lse) {
  const char* fn = "qstar_cuda::lm_head_lse_merge_";
  check_cuda(fn, "z", z, z);
  check_tile(fn, z);
  check_rows(fn, "lse", lse, z.size(0), at::kFloat, z);
  c10::cuda::CUDAGuard guard(z.device());
  check_launch(fn, lm_head_lse_merge(dtype_of(fn, "z", z), z.data_ptr(), z.stride(0), z.size(0),
                                     z.size(1), lse.data_ptr<float>(), current_stream()));
}

at::Tensor target_logits(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target) {
  const char* fn = "qstar_cuda::lm_head_target_logits";
  check_cuda(fn, "h", h, h);
  TORCH_CHECK(h.dim() == 2, fn, ": h must be 2-D (n, H), got shape ", h.sizes());
  check_contiguous(fn, "h", h);
  check_cuda(fn, "weight", weight, h);
  check_dtype(fn, "weight", weight, h.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h.size(1), fn,
              ": weight must be 2-D (V, H) with H = ", h.size(1), ", got shape ", weight.sizes());
  check_contiguous(fn, "weight", weight);
  check_rows(fn, "target", target, h.size(0), at::kLong, h);
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({h.size(0)}, h.options().dtype(at::kFloat));
  check_launch(fn, lm_head_target_logits(dtype_of(fn, "h", h), h.data_ptr(), weight.data_ptr(),
                                         target.data_ptr<int64_t>(), out.data_ptr<float>(),
                                         h.size(0), h.size(1), weight.size(0), current_stream()));
  return out;
}

void grad_rows_(at::Tensor& z, const at::Tensor& lse, const at::Tensor& index,
                const at::Tensor& coef, double scale) {
  const char* fn = "qstar_cuda::lm_head_grad_rows_";
  check_cuda(fn, "z", z, z);
  check_tile(fn, z);
  check_rows(fn, "lse", lse, z.size(0), at::kFloat, z);
  check_rows(fn, "index", index, z.size(0), at::kLong, z);
  check_rows(fn, "coef", coef, z.size(0), at::kFloat, z);
  c10::cuda::CUDAGuard guard(z.device());
  check_launch(fn, lm_head_grad_rows(dtype_of(fn, "z", z), z.data_ptr(), z.stride(0), z.size(0),
                                     z.size(1), lse.data_ptr<float>(), index.data_ptr<int64_t>(),
                                     coef.data_ptr<float>(), static_cast<float>(scale), current_stream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mix_backward(const at::Tensor& grad_h,
                                                            const at::Tensor& h_base,
                                                            const at::Tensor& h_thought,
                                                            const at::Tensor& w) {
  const char* fn = "qstar_cuda::lm_head_mix_backward";
  check_mix_inputs(fn, h_base, h_thought, w);
  check_cuda(fn, "grad_h", grad_h, h_base);
  check_dtype(fn, "grad_h", grad_h, at::kFloat);
  TORCH_CHECK(grad_h.sizes() == h_base.sizes(), fn, ": grad_h must have the shape of h_base ",
              h_base.sizes(), ", got ", grad_h.sizes());
  check_contiguous(fn, "grad_h", grad_h);
  c10::cuda::CUDAGuard guard(h_base.device());
  at::Tensor gb = at::empty_like(grad_h), gt = at::empty_like(grad_h);
  at::Tensor gw = at::empty({h_base.size(0)}, grad_h.options());
  check_launch(fn, lm_head_mix_backward(dtype_of(fn, "h_base", h_base), grad_h.data_ptr<float>(),
                                        h_base.data_ptr(), h_thought.data_ptr(),
                                        w.data_ptr<float>(), gb.data_ptr<float>(),
                                        gt.data_ptr<float>(), gw.data_ptr<float>(),
                                        h_base.size(0), h_base.size(1), current_stream()));
  return {gb, gt, gw};
}

}  // namespace
}  // namespace qstar::cuda

TORCH_LIBRARY_FRAGMENT(qstar_cuda, m) {
  m.def("lm_head_mix(Tensor h_base, Tensor h_thought, Tensor w, ScalarType dtype) -> Tensor");
  m.def("lm_head_lse_merge_(Tensor z, Tensor(a!) lse) -> ()");
  m.def("lm_head_target_logits(Tensor h, Tensor weight, Tensor target) -> Tensor");
  m.def(
      "lm_head_grad_rows_(Tensor(a!) z, Tensor lse, Tensor index, Tensor coef, float scale) -> ()");
  m.def(
      "lm_head_mix_backward(Tensor grad_h, Tensor h_base, Tensor h_thought, Tensor w)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qstar_cuda, CUDA, m) {
  m.impl("lm_head_mix", &qstar::cuda::mix);
  m.impl("lm_head_lse_merge_", &qstar::cuda::lse_merge_);
  m.impl("lm_head_target_logits", &qstar::cuda::target_logits);
  m.impl("lm_head_grad_rows_", &qstar::cuda::grad_rows_);
  m.impl("lm_head_mix_backward", &qstar::cuda::mix_backward);
}
