"""The Long Range Arena transformer: token and learned position embeddings, pre-norm encoder blocks, mean
pooling over real tokens, a classifier; Retrieval encodes two documents with one tower and classifies the
pair. The attention is the swept choice:

- `standard`: softmax(QKᵀ)V written out, materialising the N×N matrix (the paper's baseline);
- `flash`: our FlashAttention kernel;
- `flash_sparse`: our kernel skipping the zero blocks of the butterfly block mask (the paper's pattern);
- `linformer`: keys and values projected along the sequence to `linformer_k` rows (Wang et al. 2020).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from kernels import BlockSparseLayout, butterfly_block_mask, flash_attn

ATTENTIONS = ("standard", "flash", "flash_sparse", "linformer")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str, seq_len: int, linformer_k: int, block_size: int,
                 dropout: float):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention={kind!r} is not one of {ATTENTIONS}")
        self.kind, self.heads, self.dropout, self.block_size = kind, heads, dropout, block_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        if kind == "linformer":
            self.project_k = nn.Linear(seq_len, linformer_k, bias=False)
            self.project_v = nn.Linear(seq_len, linformer_k, bias=False)
        if kind == "flash_sparse":
            blocks = math.ceil(seq_len / block_size)
            self.register_buffer("block_mask", butterfly_block_mask(blocks, blocks), persistent=False)
            self._layout = None

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.kind == "standard":
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
            attn = F.dropout(scores.softmax(-1).nan_to_num(0.0), p)
            y = attn @ v
        elif self.kind == "linformer":
            keep = real[:, None, :, None].to(k.dtype)  # padding contributes nothing to the projections
            k = self.project_k((k * keep).transpose(-1, -2)).transpose(-1, -2)
            v = self.project_v((v * keep).transpose(-1, -2)).transpose(-1, -2)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            kpm = None if bool(real.all()) else real
            block_mask = None
            if self.kind == "flash_sparse":
                if self._layout is None or self._layout.mask.device != x.device or self._batch != (b, self.heads):
                    self._layout, self._batch = BlockSparseLayout(self.block_mask, b, self.heads, self.block_size), \
                        (b, self.heads)
                block_mask = self._layout
            y = flash_attn(q, k, v, dropout_p=p, key_padding_mask=kpm, block_mask=block_mask,
                           block_size=self.block_size)
        return self.out(y.transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, dropout: float, **attention):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, dropout=dropout, **attention)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, real):
        x = x + self.drop(self.attn(self.norm1(x), real))
        return x + self.drop(self.mlp(self.norm2(x)))


class LRAClassifier(nn.Module):
    def __init__(self, *, vocab: int, classes: int, seq_len: int, dim: int, heads: int, depth: int, mlp_dim: int,
                 attention: str, dropout: float = 0.0, linformer_k: int = 256, block_size: int = 128,
                 pair: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, mlp_dim, dropout, heads=heads, kind=attention, seq_len=seq_len,
                                          linformer_k=linformer_k, block_size=block_size) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        features = 4 * dim if pair else dim
        self.head = nn.Sequential(nn.Linear(features, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, classes))

    def encode(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, real)
        x = self.norm(x)
        weights = real.to(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # mean over real tokens

    def forward(self, input_ids, real, labels, input_ids2=None, real2=None):
        u = self.encode(input_ids, real)
        if input_ids2 is not None:  # Retrieval: one tower for both documents, then the pair's features
            v = self.encode(input_ids2, real2)
            u = torch.cat([u, v, u * v, u - v], -1)
        logits = self.head(u)
        return SimpleNamespace(loss=F.cross_entropy(logits.float(), labels), logits=logits)


def upsample_positions(model: LRAClassifier, new_side: int) -> None:
    """Path-X / Path-256 recipe: grow the learned position table of a square image (side² positions) to
    new_side² by bilinear interpolation on the grid, keeping the weights' spatial meaning."""
    old = model.position.weight.data
    side = math.isqrt(old.shape[0])
    if side * side != old.shape[0]:
        raise ValueError(f"the position table has {old.shape[0]} rows, not a square image's")
    grid = old.T.reshape(1, -1, side, side)
    grown = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False)
    model.position = nn.Embedding.from_pretrained(grown.reshape(old.shape[1], -1).T.contiguous(), freeze=False)
