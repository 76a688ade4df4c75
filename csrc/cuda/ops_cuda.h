// CUDA entry points of faststeal._C (bound in bind_cuda.cpp as <op>_<fwd|bwd>_cuda), declared
// in op_entry_points.inc like the CPU ones; float32, float16, bfloat16 (fp32 accumulation) and
// float64.
#pragma once

#include "../ops.h"

namespace faststeal {
namespace gpu {

#include "../op_entry_points.inc"

}  // namespace gpu
}  // namespace faststeal
