"""What runs a quantized model besides eager PyTorch (Inductor, ONNX Runtime) and how fast it runs."""
