"""Export: a model and its compiled plan as ONNX graphs (`exporter`), run by onnxruntime (`onnx`).

A static plan makes the compressed cache a fixed set of tensors, so a prefill graph and a step graph
that take and return them run in plain onnxruntime. Needs the `kvc[onnx]` extra.
"""
