"""Greenformers (Cahyawijaya, arXiv 2108.10808): the Low-Rank Transformer (linear layers factorised, W ≈ U·V)
against Linformer on a BERT-shaped encoder: where each one wins, what LRT saves on BERT-base, and what it costs
in accuracy."""
