// Python bindings of the CPU kernels (module qstar_kernels._C). Thin: the kernels live one per
// file.
#include <torch/extension.h>

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
}
