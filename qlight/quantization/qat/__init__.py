"""What quantization-aware training needs besides its callbacks: fake-quantized layers, the phases of
a PT2E graph, the per-epoch results table."""
