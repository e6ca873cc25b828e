"""Scissorhands (Liu et al., NeurIPS 2023): a KV cache of fixed budget per head that drops the tokens least often
important, against H2O, StreamingLLM and TOVA; evaluated by simulation (a masked forward pass, the authors'
protocol) and by real eviction during token-by-token decoding, optionally on a 2-8-bit quantized cache.

policies.py (the rules), simulate.py and generate.py (the two ways to run them), hooks.py (how they enter a
transformers model); the task scissorhands_kv: task.py (its experiments on a model), bench.py (decode memory and
speed on model-shaped heads), memory.py (KV bytes: the paper's Tables 1-2 and measured)."""
