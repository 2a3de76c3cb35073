"""TensorRT backend: lowers the standard-op IR to a TensorRT network and serialises an engine.

Works with `tensorrt_rtx` (builds on a machine without a GPU) and with `tensorrt` when that
module is importable; see trt_module.py for the one place where the two differ.
"""
