// The kernels' test mode ("poison"): while a switch is on, every buffer a kernel allocates
// (outputs, tables, scratch) is filled with NaN (-7 for integers) before the kernel runs, so that a
// test proves that every output element is written and that no scratch is read before it is
// written. Host code (ATen), for the CPU kernels and the CUDA ops' glue; never included by a .cu
// file. Each op family keeps its own switch (Python: _set_poison_outputs, lm_head_set_poison).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace qstar {

class PoisonSwitch {
 public:
  // Turns the test mode on or off; returns the previous setting.
  bool set(bool on) { return on_.exchange(on); }

  // t itself, filled with poison while the switch is on.
  at::Tensor operator()(at::Tensor t) const {
    if (on_.load(std::memory_order_relaxed) && t.numel() > 0) {
      if (at::isFloatingType(t.scalar_type()))
        t.fill_(std::numeric_limits<double>::quiet_NaN());
      else
        t.fill_(-7);
    }
    return t;
  }

 private:
  std::atomic<bool> on_{false};
};

}  // namespace qstar
