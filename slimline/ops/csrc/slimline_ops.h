// The CUDA half of slimline's custom ops (skip_rms_norm.cu), called from slimline_ops.cc.
#pragma once
#include <cstdint>

extern "C" {
// Returns 0, or a cudaError_t code. half: the tensors are fp16 (else fp32). sum may be null.
int slimline_skip_rms_norm_cuda(bool half, const void* x, const void* skip, const void* gamma, void* y, void* sum,
                                int64_t rows, int64_t width, float epsilon, void* stream);
const char* slimline_cuda_error(int code);
}
