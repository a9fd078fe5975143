"""condgen.server: the batched gRPC inference server (ONNX Runtime, no torch)."""
