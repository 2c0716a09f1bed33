"""ONNX export with parity checks, fusion into ONNX Runtime's fused contrib ops (rules and their
registry in ``compile/fusions``), and ``compile.tune``, which keeps a fused op only where it is faster."""
