"""Quantization stages: int8 dynamic today; static, weight-only and bitsandbytes build on the same report."""
