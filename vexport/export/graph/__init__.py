"""ONNX graphs built node by node from a config: plain (any runtime), fused (ONNX Runtime), int4 Linears for
ONNX Runtime (MatMulNBits) and TensorRT (blocked DequantizeLinear), and the weights they stream."""
