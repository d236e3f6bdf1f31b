"""SplitQ post-training quantization for VLMs (llm-compressor plugin)."""
