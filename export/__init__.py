"""ONNX export and ONNX Runtime encoder."""
