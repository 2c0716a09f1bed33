// CUDA kernel of slimline's SkipRMSNorm (see slimline_ops.cc for the op's definition).
// One block per row; each thread strides over the row. The sum of squares is accumulated in fp32
// (warp shuffles, then one value per warp in shared memory), whatever the tensors' type.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "slimline_ops.h"

namespace {

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T store(float v);
template <>
__device__ __forceinline__ float store<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void skip_rms_norm(const T* __restrict__ x, const T* __restrict__ skip, const T* __restrict__ gamma,
                              T* __restrict__ y, T* __restrict__ sum, int64_t width, float epsilon) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * width;
  const T* kr = skip + row * width;
  float squares = 0.f;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    T rounded = store<T>(load(xr[i]) + load(kr[i]));
    if (sum) sum[row * width + i] = rounded;
    float v = load(rounded);
    squares += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(0xffffffff, squares, offset);
  __shared__ float warp_sums[32];
  __shared__ float inv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = squares;
  __syncthreads();
  if (warp == 0) {
    float total = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffff, total, offset);
    if (lane == 0) inv = rsqrtf(total / static_cast<float>(width) + epsilon);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    float v = load(store<T>(load(xr[i]) + load(kr[i])));
    y[row * width + i] = store<T>(v * inv * load(gamma[i]));
  }
}

}  // namespace

extern "C" int slimline_skip_rms_norm_cuda(bool half, const void* x, const void* skip, const void* gamma, void* y,
                                           void* sum, int64_t rows, int64_t width, float epsilon, void* stream) {
  int threads = 32;
  while (threads < 1024 && threads < width) threads <<= 1;  // a power of two, at most 1024, covering the row
  if (threads > 256 && width < 4 * threads) threads = 256;
  dim3 grid(static_cast<unsigned>(rows));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (half) {
    skip_rms_norm<__half><<<grid, threads, 0, s>>>(static_cast<const __half*>(x), static_cast<const __half*>(skip),
                                                   static_cast<const __half*>(gamma), static_cast<__half*>(y),
                                                   static_cast<__half*>(sum), width, epsilon);
  } else {
    skip_rms_norm<float><<<grid, threads, 0, s>>>(static_cast<const float*>(x), static_cast<const float*>(skip),
                                                  static_cast<const float*>(gamma), static_cast<float*>(y),
                                                  static_cast<float*>(sum), width, epsilon);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* slimline_cuda_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
