"""Policy exporters: ONNX, safetensors; parity checks; sealing and publishing."""
