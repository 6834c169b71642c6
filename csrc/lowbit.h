// lowbit.h: the constants of the opt-in low-precision state (momentum_dtype, param_rounding), shared by the
// host code (ops.cpp), the device math (came_math.cuh) and the table (plan.h). Mirrors torch_backend's
// QBLOCK, STREAM_MOMENTUM / STREAM_PARAM and triton_kernels' MK_* / ROUNDINGS.
#pragma once

#include <cstdint>

namespace came {

constexpr int64_t kQBlock = 256;         // elements of the flattened tensor per int8 absmax
constexpr uint32_t kStreamMomentum = 0;  // Philox counter word 3: which rounding the bits are for
constexpr uint32_t kStreamParam = 1;
// Momentum storage kinds (TensorRef::mkind, LowbitDesc::mkind) and param roundings (bf16 params).
constexpr int kMomFp32 = 0, kMomBf16 = 1, kMomInt8 = 2;
constexpr int kRoundNearest = 0, kRoundStochastic = 1, kRoundKahan = 2;
// The phase-3 and phase-4 kernels' kLow (triton_kernels' LB_*): the default bodies only; the default bodies
// with bf16 momenta where a tensor has one (no int8 momentum, params rounded to nearest); the _lp bodies.
constexpr int kLowNone = 0, kLowBf16 = 1, kLowAll = 2;

}  // namespace came
