"""The measurement floor under every stage, evaluator and benchmark.

- ``timer``: the one interleaved (ABBA) timer, medians and percentiles, and how busy other processes
  keep the CPUs.
- ``inputs``: model inputs: fixed and real-traffic batches, parity cases, calibration feeds, the
  decoder's token stream.
- ``metrics``: how much an output changed: cosine, relative error and SQNR, top-k overlap, rank
  correlation, classification scores.
- ``parity``: two implementations on the same inputs, their worst disagreement.
- ``data``: calibration and evaluation text.
- ``quantsim``: the int8 rounding ONNX Runtime applies, as numpy and torch functions.

Nothing here imports a stage, an evaluator or the pipeline: they all stand on it.
"""
