// What every launch interface of the CUDA kernels shares (thought_attention_cuda.h,
// mixing_cuda.h): the element types the kernels are compiled for, and the launch configuration
// that the resource test reads. Plain C++: no CUDA or torch header.
#pragma once

namespace qstar::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The launch configuration of one kernel instance, for the resource test: the kernel's base name
// (a substring of its mangled name), the dtype and head dim it serves (0: any), threads per block
// and the dynamic shared memory it is launched with.
struct LaunchInfo {
  const char* kernel;
  DType dtype;
  int head_dim;
  int threads;
  int dynamic_smem;
};

}  // namespace qstar::cuda
