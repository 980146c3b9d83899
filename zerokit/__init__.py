"""zerokit: sharded LLM training on DeepSpeed ZeRO and PyTorch FSDP."""
__version__ = "0.1.0"
