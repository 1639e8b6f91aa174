"""qlight's quantized files: the format that ``load_quantized`` reads (``serialization``)."""
