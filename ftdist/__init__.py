"""ftdist: fine-tune Hugging Face causal LMs with Ray Train driving DeepSpeed ZeRO workers."""

__version__ = "0.1.0"
