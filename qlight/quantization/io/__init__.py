"""Files and runtimes: the quantized file format, ONNX Runtime and Inductor, speed measurement, and
every byte count (``sizes``)."""
