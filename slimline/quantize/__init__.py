"""Quantization stages: int8 dynamic and static (ONNX Runtime's quantizers, on a shared template),
SmoothQuant, weight-only int4/int8 (RTN, HQQ, GPTQ in MatMulNBits), fp16 for the CUDA EP, and
bitsandbytes for PyTorch serving. Each reports its per-layer error and guards the output cosine."""
