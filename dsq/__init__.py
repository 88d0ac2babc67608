"""dsq: pre-training Transformer language models with quantized linear layers and optimizer states."""

__version__ = "0.1.0"
