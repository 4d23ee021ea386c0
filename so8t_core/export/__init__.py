"""Exports outside llama.cpp: the baked model as ONNX (``onnx``), checked with onnxruntime
against the PyTorch reference before it is written.

Layer rule: modules here import ``validate`` and what is below it, nothing above.
"""
