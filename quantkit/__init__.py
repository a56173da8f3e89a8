"""quantkit: turn LLM checkpoints into the quantized variants people deploy, and measure them."""

__version__ = "0.1.0"
