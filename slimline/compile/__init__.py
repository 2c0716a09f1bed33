"""ONNX export, fusion into ONNX Runtime's fused contrib ops, and parity checks."""
