"""Scissorhands (Liu et al., NeurIPS 2023): a KV cache of fixed budget per head that drops the tokens least often
important, against H2O, StreamingLLM and TOVA; evaluated by simulation (a masked forward pass, the authors'
protocol) and by real eviction during token-by-token decoding, optionally on a 2-8-bit quantized cache."""
