// slimline's own ONNX Runtime custom ops (domain "ai.slimline"), built from source by slimline.ops.build.
//
// SkipRMSNorm(input, skip, gamma) -> (output, input_skip_sum?)
//   s = input + skip (rounded to the input type, as an unfused Add would), then
//   output = s / sqrt(mean(s^2 over the last axis) + epsilon) * gamma.
// It is com.microsoft.SkipSimplifiedLayerNormalization without bias, with the mean square always
// accumulated in fp32, so an fp16 row whose mean square passes 65504 (a decoder's "massive
// activation") can't become inf, whatever kernel variant ONNX Runtime would pick.
//
// Kernels: CPU for float and float16 (always built), CUDA for float and float16 (skip_rms_norm.cu,
// built where nvcc is found; SLIMLINE_OPS_CUDA is then defined). The C API is versioned: these are
// compiled against one release's headers and load in that release and every later one.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "slimline_ops.h"

namespace {

const char* kDomain = "ai.slimline";

OrtStatusPtr Fail(const OrtApi& api, const std::string& msg) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("slimline SkipRMSNorm: " + msg).c_str());
}

inline float Load(float v) { return v; }
inline float Load(Ort::Float16_t v) { return v.ToFloat(); }
template <typename T>
inline T Store(float v);
template <>
inline float Store<float>(float v) { return v; }
template <>
inline Ort::Float16_t Store<Ort::Float16_t>(float v) { return Ort::Float16_t(v); }

// The CPU kernel; also the numerics the CUDA kernel and the numpy reference follow.
template <typename T>
void SkipRmsNormCpu(const T* x, const T* skip, const T* gamma, T* y, T* sum, int64_t rows, int64_t width,
                    float epsilon) {
  std::vector<float> s(static_cast<size_t>(width));
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    const T* kr = skip + r * width;
    float squares = 0.f;  // fp32 accumulation whatever T is
    for (int64_t i = 0; i < width; ++i) {
      T rounded = Store<T>(Load(xr[i]) + Load(kr[i]));
      if (sum) sum[r * width + i] = rounded;
      float v = Load(rounded);
      s[i] = v;
      squares += v * v;
    }
    float inv = 1.f / std::sqrt(squares / static_cast<float>(width) + epsilon);
    for (int64_t i = 0; i < width; ++i) y[r * width + i] = Store<T>(s[i] * inv * Load(gamma[i]));
  }
}

struct SkipRmsNormKernel {
  const OrtApi& api;
  float epsilon;
  bool cuda;
  ONNXTensorElementDataType type;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      auto x = ctx.GetInput(0);
      auto skip = ctx.GetInput(1);
      auto gamma = ctx.GetInput(2);
      std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return Fail(api, "input must have at least one axis");
      if (skip.GetTensorTypeAndShapeInfo().GetShape() != shape)
        return Fail(api, "skip must have the input's shape (no broadcasting)");
      const int64_t width = shape.back();
      std::vector<int64_t> gshape = gamma.GetTensorTypeAndShapeInfo().GetShape();
      if (gshape.size() != 1 || gshape[0] != width)
        return Fail(api, "gamma must be 1-D with the input's last dimension (" + std::to_string(width) + ")");
      const int64_t count = x.GetTensorTypeAndShapeInfo().GetElementCount();
      const int64_t rows = width ? count / width : 0;
      auto y = ctx.GetOutput(0, shape);
      void* sum = nullptr;
      if (ctx.GetOutputCount() > 1) {
        auto s = ctx.GetOutput(1, shape);  // an optional output the graph doesn't read comes back empty
        if (s) sum = s.GetTensorMutableRawData();
      }
      if (rows == 0) return nullptr;
      if (cuda) {
#ifdef SLIMLINE_OPS_CUDA
        void* stream = ctx.GetGPUComputeStream();
        int err = slimline_skip_rms_norm_cuda(type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, x.GetTensorRawData(),
                                              skip.GetTensorRawData(), gamma.GetTensorRawData(),
                                              y.GetTensorMutableRawData(), sum, rows, width, epsilon, stream);
        if (err) return Fail(api, std::string("CUDA launch failed: ") + slimline_cuda_error(err));
#else
        return Fail(api, "this build has no CUDA kernels");
#endif
      } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        SkipRmsNormCpu(x.GetTensorData<float>(), skip.GetTensorData<float>(), gamma.GetTensorData<float>(),
                       y.GetTensorMutableData<float>(), static_cast<float*>(sum), rows, width, epsilon);
      } else {
        SkipRmsNormCpu(x.GetTensorData<Ort::Float16_t>(), skip.GetTensorData<Ort::Float16_t>(),
                       gamma.GetTensorData<Ort::Float16_t>(), y.GetTensorMutableData<Ort::Float16_t>(),
                       static_cast<Ort::Float16_t*>(sum), rows, width, epsilon);
      }
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Fail(api, e.what());
    }
  }
};

struct SkipRmsNormOp : Ort::CustomOpBase<SkipRmsNormOp, SkipRmsNormKernel, true> {
  SkipRmsNormOp(const char* provider, ONNXTensorElementDataType type) : provider_(provider), type_(type) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    float epsilon = 1e-6f;  // slimline's rewrite always copies the fused node's own epsilon
    float value = 0.f;
    if (OrtStatus* missing = api.KernelInfoGetAttribute_float(info, "epsilon", &value)) {
      api.ReleaseStatus(missing);
    } else {
      epsilon = value;
    }
    *kernel = new SkipRmsNormKernel{api, epsilon, provider_ != nullptr && std::string(provider_) == "CUDAExecutionProvider",
                                    type_};
    return nullptr;
  }
  const char* GetName() const { return "SkipRMSNorm"; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type_; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type_; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

 private:
  const char* provider_;
  ONNXTensorElementDataType type_;
};

std::vector<SkipRmsNormOp>& Ops() {
  static std::vector<SkipRmsNormOp> ops = [] {
    std::vector<SkipRmsNormOp> v;
    v.emplace_back("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    v.emplace_back("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
#ifdef SLIMLINE_OPS_CUDA
    v.emplace_back("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    v.emplace_back("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
#endif
    return v;
  }();
  return ops;
}

}  // namespace

#define SLIMLINE_EXPORT __attribute__((visibility("default")))

extern "C" {

// Called by SessionOptions.register_custom_ops_library.
SLIMLINE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an older runtime than the headers: nothing can be reported through it
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  for (auto& op : Ops()) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &op)) return st;
  }
  for (OrtCustomOp* op : slimline_q4_ops()) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  // the domain must outlive every session that uses it; one per registration, released at exit
  static std::mutex lock;
  static std::vector<Ort::CustomOpDomain> keep;
  std::lock_guard<std::mutex> guard(lock);
  keep.emplace_back(domain);
  return api->AddCustomOpDomain(options, domain);
}

// What this build holds, for slimline.ops.info(): "cpu" or "cpu,cuda".
SLIMLINE_EXPORT const char* SlimlineOpsProviders() {
#ifdef SLIMLINE_OPS_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

// The CPU kernel MatMulQ4 runs on this machine, for slimline.ops.info().
SLIMLINE_EXPORT const char* SlimlineOpsMatMulQ4Kernel() { return slimline_matmul_q4_kernel(); }

}  // extern "C"
