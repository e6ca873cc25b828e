"""Pre-gated MoE (Hwang et al., ISCA 2024): a Switch-shaped mixture-of-experts LM with an optional pre-gate
(model.py) and the expert-offloading runtime whose strategies the paper compares (offload.py)."""
