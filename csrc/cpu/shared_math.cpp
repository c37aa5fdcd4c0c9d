// The shared per-element maths (common/softmax_math.h, common/lm_head_math.h) run on the CPU in
// exactly the sequence the CUDA kernels run it, so that tests can check it against PyTorch
// without a GPU (tests/test_shared_math.py):
//
// * online_softmax_rows: per row, the first n_push scores pushed one at a time (the diagonal keys
//   of thought attention, attn_fwd_kernel's first stage), then the rest in tiles of `tile` scores
//   (max, exp_shifted, softmax_merge, rescale_factor: the text-key stage), the normalised weights
//   (softmax_inv_sum) and the lse (softmax_lse);
// * softmax_bwd_rows: dS = P (dP - Delta) with P = prob_from_lse and Delta =
//   softmax_bwd_row_term, as the backward kernels compute it;
// * lse_merge_tiles: the LM head's online log-softmax over column tiles (lse_merge_nan);
// * logit_grad_rows: the gradient epilogue coef (onehot - exp(z - lse)) (logit_grad).
#include "cpu/shared_math.h"

#include <cmath>
#include <limits>
#include <vector>

#include "common/lm_head_math.h"
#include "common/softmax_math.h"

namespace qstar::cpu {
namespace {

void check_2d(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat, fn,
              ": expects a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> online_softmax_rows(const at::Tensor& scores, int64_t n_push,
                                                       int64_t tile) {
  check_2d("online_softmax_rows", scores);
  TORCH_CHECK(tile >= 1 && n_push >= 0, "online_softmax_rows: tile >= 1 and n_push >= 0");
  const at::Tensor x = scores.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor probs = at::empty({R, C}, x.options()), lse = at::empty({R}, x.options());
  const float* xs = x.data_ptr<float>();
  float* ps = probs.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* row = xs + r * C;
    std::vector<float> acc(C, 0.f);  // the running weights (the kernel's O with one-hot values)
    SoftmaxState<float> st = softmax_state_empty<float>();
    const int64_t np = n_push < C ? n_push : C;
    for (int64_t j = 0; j < np; ++j) {
      const float alpha = softmax_push(st, row[j]);
      const float p = rescale_factor(row[j], st.m);
      for (int64_t k = 0; k < j; ++k) acc[k] *= alpha;
      acc[j] = p;
    }
    for (int64_t t0 = np; t0 < C; t0 += tile) {
      const int64_t t1 = t0 + tile < C ? t0 + tile : C;
      float m_blk = neg_inf<float>();
      for (int64_t j = t0; j < t1; ++j) m_blk = row[j] > m_blk ? row[j] : m_blk;
      float l_blk = 0.f;
      std::vector<float> p(t1 - t0);
      for (int64_t j = t0; j < t1; ++j) l_blk += (p[j - t0] = exp_shifted(row[j], m_blk));
      const float alpha = softmax_merge(st, m_blk, l_blk);
      const float beta = rescale_factor(m_blk, st.m);
      for (int64_t k = 0; k < t0; ++k) acc[k] *= alpha;
      for (int64_t j = t0; j < t1; ++j) acc[j] = p[j - t0] * beta;
    }
    const float inv = softmax_inv_sum(st);
    for (int64_t j = 0; j < C; ++j) ps[r * C + j] = acc[j] * inv;
    lse.data_ptr<float>()[r] = softmax_lse(st);
  }
  return {probs, lse};
}

at::Tensor softmax_bwd_rows(const at::Tensor& scores, const at::Tensor& lse, const at::Tensor& dp,
                            const at::Tensor& do_dot_o, const at::Tensor& grad_lse) {
  check_2d("softmax_bwd_rows", scores);
  const at::Tensor x = scores.contiguous(), l = lse.contiguous(), d = dp.contiguous();
  const at::Tensor dd = do_dot_o.contiguous(), gl = grad_lse.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor ds = at::empty({R, C}, x.options());
  for (int64_t r = 0; r < R; ++r) {
    const float delta = softmax_bwd_row_term(dd.data_ptr<float>()[r], gl.data_ptr<float>()[r]);
    for (int64_t j = 0; j < C; ++j) {
      const float p = prob_from_lse(x.data_ptr<float>()[r * C + j], l.data_ptr<float>()[r]);
      ds.data_ptr<float>()[r * C + j] = p == 0.f ? 0.f : p * (d.data_ptr<float>()[r * C + j] - delta);
    }
  }
  return ds;
}

at::Tensor lse_merge_tiles(const at::Tensor& z, int64_t tile) {
  check_2d("lse_merge_tiles", z);
  TORCH_CHECK(tile >= 1, "lse_merge_tiles: tile must be >= 1, got ", tile);
  const at::Tensor x = z.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor lse = at::full({R}, neg_inf<double>(), x.options());
  for (int64_t r = 0; r < R; ++r) {
    const float* row = x.data_ptr<float>() + r * C;
    float run = neg_inf<float>();
    for (int64_t t0 = 0; t0 < C; t0 += tile) {
      const int64_t t1 = t0 + tile < C ? t0 + tile : C;
      float m = neg_inf<float>();
      bool bad = false;
      for (int64_t j = t0; j < t1; ++j) {
        bad |= row[j] != row[j] || row[j] == -neg_inf<float>();
        m = row[j] > m ? row[j] : m;
      }
      float s = 0.f;
      for (int64_t j = t0; j < t1; ++j) s += exp_shifted(row[j], m);
      const float blk = bad ? std::numeric_limits<float>::quiet_NaN()
                            : softmax_lse(SoftmaxState<float>{m, s});
      run = lse_merge_nan(run, blk);
    }
    lse.data_ptr<float>()[r] = run;
  }
  return lse;
}

at::Tensor logit_grad_rows(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& index,
                           const at::Tensor& coef, double scale) {
  check_2d("logit_grad_rows", z);
  const at::Tensor x = z.contiguous(), l = lse.contiguous(), c = coef.contiguous();
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({R, C}, x.options());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j)
      out.data_ptr<float>()[r * C + j] =
          logit_grad(x.data_ptr<float>()[r * C + j], static_cast<float>(scale),
                     l.data_ptr<float>()[r], c.data_ptr<float>()[r], j == idx.data_ptr<int64_t>()[r]);
  return out;
}

}  // namespace qstar::cpu
