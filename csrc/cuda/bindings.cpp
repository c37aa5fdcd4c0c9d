// Torch glue of the CUDA extension (qstar_kernels._C_cuda). The kernels live in the .cu files and
// take raw pointers; this file checks inputs and launches them on the current stream.

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cuda/mixing_cuda.h"
#include "cuda/ops.h"
#include "cuda/thought_attention_cuda.h"

namespace {

at::Tensor build_thought_mask_cuda(const std::optional<at::Tensor>& keep, int64_t B, int64_t L,
                                   int64_t depth, int64_t window, c10::Device device) {
  TORCH_CHECK(L >= 1, "build_thought_mask_cuda: L must be >= 1, got ", L);
  TORCH_CHECK(depth >= 0, "build_thought_mask_cuda: depth must be >= 0, got ", depth);
  TORCH_CHECK(B >= 1, "build_thought_mask_cuda: B must be >= 1, got ", B);
  TORCH_CHECK(device.is_cuda(), "build_thought_mask_cuda: device must be a CUDA device, got ", device);
  const bool* keep_ptr = nullptr;
  at::Tensor keep_c;
  if (keep.has_value()) {
    const auto& k = *keep;
    TORCH_CHECK(k.is_cuda() && k.device() == device, "build_thought_mask_cuda: keep must be on ",
                device, ", got ", k.device());
    TORCH_CHECK(k.scalar_type() == at::kBool, "build_thought_mask_cuda: keep must be bool, got ",
                k.scalar_type());
    TORCH_CHECK(k.dim() == 2 && k.size(0) == B && k.size(1) == L,
                "build_thought_mask_cuda: keep must have shape (B=", B, ", L=", L, "), got ", k.sizes());
    keep_c = k.contiguous();
    keep_ptr = keep_c.data_ptr<bool>();
  }
  c10::cuda::CUDAGuard guard(device);
  auto mask = at::empty({B, 1, L, (depth + 1) * L}, at::TensorOptions().dtype(at::kBool).device(device));
  qstar::cuda::check_launch(
      "build_thought_mask_cuda",
      qstar::cuda::launch_thought_mask(keep_ptr, mask.data_ptr<bool>(), B, L, depth, window,
                                       qstar::cuda::current_stream()));
  return mask;
}

// The launch configuration of every kernel instance (for the resource test).
py::list launch_table() {
  const char* dtypes[] = {"float32", "float16", "bfloat16"};
  qstar::cuda::LaunchInfo rows[128];
  int n = qstar::cuda::thought_attention_launch_table(rows, 128);
  TORCH_CHECK(n <= 128, "launch_table: more than 128 kernel instances");
  n += qstar::cuda::mixing_launch_table(rows + n, 128 - n);
  TORCH_CHECK(n <= 128, "launch_table: more than 128 kernel instances");
  py::list out;
  for (int i = 0; i < n; ++i) {
    py::dict d;
    d["kernel"] = rows[i].kernel;
    d["dtype"] = dtypes[static_cast<int>(rows[i].dtype)];
    d["head_dim"] = rows[i].head_dim;
    d["threads"] = rows[i].threads;
    d["dynamic_smem"] = rows[i].dynamic_smem;
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qstar-kernels CUDA kernels";
  m.def("build_thought_mask", &build_thought_mask_cuda, "Dense bool thought mask on a CUDA device",
        py::arg("keep"), py::arg("B"), py::arg("L"), py::arg("depth"), py::arg("window"),
        py::arg("device"));
  m.def("_set_poison_outputs", &qstar::cuda::set_poison_outputs,
        "Test mode: fill every output of the qstar_cuda ops with NaN before the kernels write it. "
        "Returns the previous setting.",
        py::arg("on"));
  m.def("check_attention_inputs", &qstar::cuda::check_attention_inputs,
        "The C++ input checks of qstar_cuda::thought_attention_fwd on any device (for tests); "
        "returns [B, Hq, Hkv, L, D, a, window]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("keep"), py::arg("scale"),
        py::arg("window"));
  m.def("launch_table", &launch_table,
        "Every kernel instance with its threads per block and dynamic shared memory (bytes)");
}
