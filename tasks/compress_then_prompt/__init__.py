"""Compress, Then Prompt (Xu, Liu et al. 2023, arXiv 2305.11186). The weight compression it starts from: GPTQ and
round-to-nearest quantization, SparseGPT, Wanda and magnitude pruning, SparseGPT's joint prune-and-quantize mode
(4-bit + 50% is the paper's "8x" LLaMA-7B), applied block by block to a transformers causal LM; the compressed
model is stored as codes, scales and masks, saved, reloaded and counted in bytes (compress.py, methods.py,
storage.py). Then the soft prompt that recovers its quality, the hard prompt and LoRA beside it (prompt.py,
lora.py), and the task that measures them all (task.py, data.py)."""
from .compress import BITS, CompressionReport, compress
from .methods import METHODS, compress_layer
from .storage import CompressedLinear, load_compressed, save_compressed, weight_bytes

__all__ = ["BITS", "METHODS", "CompressedLinear", "CompressionReport", "compress", "compress_layer",
           "load_compressed", "save_compressed", "weight_bytes"]
