// What slimline_ops.cc registers from the other sources: the CUDA half of SkipRMSNorm (skip_rms_norm.cu)
// and the CPU ops MatMulQ4, MatMulQ8, GatherQ4 and GatherQ8 (matmul_q4.cc).
#pragma once
#include <cstdint>
#include <vector>

struct OrtCustomOp;
std::vector<OrtCustomOp*> slimline_q4_ops();  // MatMulQ4, MatMulQ8, GatherQ4/Q8 for int64 and int32 indices
const char* slimline_matmul_q4_kernel();  // the CPU kernel this machine runs: avx512vnni, avx2 or portable

extern "C" {
// Returns 0, or a cudaError_t code. half: the tensors are fp16 (else fp32). sum may be null.
int slimline_skip_rms_norm_cuda(bool half, const void* x, const void* skip, const void* gamma, void* y, void* sum,
                                int64_t rows, int64_t width, float epsilon, void* stream);
const char* slimline_cuda_error(int code);
}
