// Python bindings of the CPU kernels (module qstar_kernels._C). Thin: the kernels live one per
// file.
#include <torch/extension.h>

#include "cpu/lm_head.h"
#include "cpu/shared_math.h"
#include "cpu/thought_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qstar_kernels CPU (C++/OpenMP) kernels";
  m.def("thought_attention_fwd", &qstar::cpu::thought_attention_fwd,
        "Thought attention forward: (q, k, v, keep, scale, window) -> (out, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("keep"), py::arg("scale"), py::arg("window"));
  m.def("thought_attention_bwd", &qstar::cpu::thought_attention_bwd,
        "Thought attention backward: (grad_out, q, k, v, out, lse, grad_lse, keep, scale, window) "
        "-> (dq, dk, dv)",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("grad_lse"), py::arg("keep"), py::arg("scale"), py::arg("window"));
  m.def("thought_attention_backend_info", &qstar::cpu::thought_attention_backend_info,
        "What the thought attention kernels run on (GEMM provider, threads, ISA), as one line");
  m.def("_set_poison_outputs", &qstar::cpu::set_poison_outputs,
        "Test mode: fill every output and scratch buffer with NaN before the kernels write it. "
        "Returns the previous setting.",
        py::arg("on"));
  m.def("lm_head_lse_fwd", &qstar::cpu::lm_head_lse_fwd,
        "LM-head forward: lse[i] = logsumexp(h[i] @ weight.T), tiled", py::arg("h"),
        py::arg("weight"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("lm_head_sample_fwd", &qstar::cpu::lm_head_sample_fwd,
        "LM-head forward: Gumbel-max tokens (greedy when inv_temperature == 0) and lse at lp_scale",
        py::arg("h"), py::arg("weight"), py::arg("banned"), py::arg("inv_temperature"),
        py::arg("lp_scale"), py::arg("seed"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("lm_head_bwd", &qstar::cpu::lm_head_bwd,
        "LM-head backward: (grad_h, grad_weight) of sum_i coef[i] / scale * logp[i]", py::arg("h"),
        py::arg("weight"), py::arg("banned"), py::arg("lse"), py::arg("index"), py::arg("coef"),
        py::arg("scale"), py::arg("need_h"), py::arg("need_weight"), py::arg("block_rows"),
        py::arg("block_cols"));
  m.def("lm_head_gumbel_noise", &qstar::cpu::lm_head_gumbel_noise,
        "The sampling pass's Gumbel noise of rows [row0, row0 + rows), float32", py::arg("seed"),
        py::arg("row0"), py::arg("rows"), py::arg("vocab"));
  m.def("lm_head_mix", &qstar::cpu::lm_head_mix,
        "The mixing prologue (1 - w) * h_base + w * h_thought in dtype", py::arg("h_base"),
        py::arg("h_thought"), py::arg("w"), py::arg("dtype"));
  m.def("lm_head_mix_backward", &qstar::cpu::lm_head_mix_backward,
        "The mixing epilogue: (grad_h_base, grad_h_thought, grad_w) from grad_h", py::arg("grad_h"),
        py::arg("h_base"), py::arg("h_thought"), py::arg("w"));
  m.def("lm_head_set_poison", &qstar::cpu::lm_head_set_poison,
        "Test mode: fill every buffer the LM-head kernels allocate with NaN. Returns the old value.",
        py::arg("on"));
  // The GPU/CPU shared maths in the CUDA kernels' sequence (tests/test_shared_math.py).
  m.def("shared_online_softmax_rows", &qstar::cpu::online_softmax_rows, py::arg("scores"),
        py::arg("n_push"), py::arg("tile"));
  m.def("shared_softmax_bwd_rows", &qstar::cpu::softmax_bwd_rows, py::arg("scores"),
        py::arg("lse"), py::arg("dp"), py::arg("do_dot_o"), py::arg("grad_lse"));
  m.def("shared_lse_merge_tiles", &qstar::cpu::lse_merge_tiles, py::arg("z"), py::arg("tile"));
  m.def("shared_logit_grad_rows", &qstar::cpu::logit_grad_rows, py::arg("z"), py::arg("lse"),
        py::arg("index"), py::arg("coef"), py::arg("scale"));
  m.def("lm_head_backend_info", &qstar::cpu::lm_head_backend_info,
        "What the LM-head kernels run on, as one line");
}
