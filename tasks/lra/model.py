"""The Long Range Arena transformer: token and learned position embeddings, pre-norm encoder blocks, mean
pooling over real tokens, a classifier; Retrieval encodes two documents with one tower and classifies the
pair. The attention is the swept choice, one of ATTENTIONS:

- `standard`: softmax(QKᵀ)V written out, materialising the N×N matrix (the paper's baseline);
- `effrepro`: our FlashAttention kernel;
- `effrepro_sparse`: our kernel skipping the zero blocks of the butterfly block mask (the paper's pattern);
- `linformer`: keys and values projected along the sequence to `linformer_k` rows (Wang et al. 2020).

Each is a module computing attention from q, k, v (batch, heads, seq, head_dim) and the real-token mask (None
where every token is real: decided on the host where batches are made, as reading it on the device costs a
sync), and counting its training FLOPs per token (`flops_per_token`, for model TFLOP/s).
"""
from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from effrepro_kernels import BlockSparseLayout, attention_reference, butterfly_block_mask, flash_attn
from tasks.common.linformer import LinformerAttention

LINFORMER_K = 256  # the keys and values a Linformer layer projects to, unless lra.model.linformer_k says


def dense_flops_per_token(width: int, seq_len: int) -> int:
    """Training FLOPs (forward and backward) per token of one layer of exact attention over `seq_len` keys: QKᵀ
    and PV, 2·width·seq_len each forward, thrice that with the backward (PaLM's 12·width·seq_len a layer)."""
    return 12 * width * seq_len


class StandardAttention(nn.Module):
    """The N×N score matrix in memory (kernels' plain reference)."""

    flops_per_token = staticmethod(dense_flops_per_token)

    def forward(self, q, k, v, real, dropout_p=0.0):
        return attention_reference(q, k, v, key_padding_mask=real, dropout_p=dropout_p)


class FlashAttention(nn.Module):
    """Our exact kernel; a subclass narrows it to a block-sparse pattern through `sparsity`."""

    needs_triton = True  # runs where our Triton kernels run (repro.bench.require_triton)
    flops_per_token = staticmethod(dense_flops_per_token)

    def forward(self, q, k, v, real, dropout_p=0.0):
        return flash_attn(q, k, v, dropout_p=dropout_p, key_padding_mask=real, **self.sparsity(q))

    def sparsity(self, q: torch.Tensor) -> dict:
        return {}


class ButterflyFlashAttention(FlashAttention):
    """Our kernel skipping the blocks outside the butterfly pattern, sized for `seq_len` tokens."""

    def __init__(self, seq_len: int, block_size: int = 128):
        super().__init__()
        blocks = math.ceil(seq_len / block_size)
        self.block_size = block_size
        self.register_buffer("block_mask", butterfly_block_mask(blocks, blocks), persistent=False)
        self._layout, self._shape = None, None

    def flops_per_token(self, width: int, seq_len: int) -> float:
        """Dense attention's count over the (query, key) pairs of the kept blocks, the only ones the kernel
        computes; a last block shorter than block_size counts its own rows and columns."""
        blocks = self.block_mask.shape[-1]
        sizes = (seq_len - torch.arange(blocks) * self.block_size).clamp(0, self.block_size).double()
        pairs = sizes @ self.block_mask[0, 0].cpu().double() @ sizes
        # dense attention computes all seq_len² pairs: the kernel, the share of them its kept blocks hold
        return dense_flops_per_token(width, seq_len) * float(pairs) / seq_len ** 2

    def sparsity(self, q):
        # the kernel's layout of the mask, built once per device and (batch, heads)
        shape = (q.device, *q.shape[:2])
        if self._shape != shape:
            self._layout, self._shape = BlockSparseLayout(self.block_mask, *q.shape[:2], self.block_size), shape
        return dict(block_mask=self._layout, block_size=self.block_size)


ATTENTIONS = {"standard": StandardAttention, "effrepro": FlashAttention, "effrepro_sparse": ButterflyFlashAttention,
              "linformer": LinformerAttention}


def build_attention(name: str, **settings) -> nn.Module:
    """The attention called `name`, built as Hydra builds a `_target_`: its class takes, from the model
    config's `settings`, the ones that are its own parameters (the others belong to other attentions)."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention={name!r} is not one of {list(ATTENTIONS)}")
    cls = ATTENTIONS[name]
    own = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in settings.items() if key in own})


class SelfAttention(nn.Module):
    """Multi-head self-attention: the q, k, v and output projections around one of ATTENTIONS."""

    def __init__(self, dim: int, heads: int, dropout: float, attention: nn.Module):
        super().__init__()
        self.heads, self.dropout, self.attend = heads, dropout, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attend(q, k, v, real, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attention: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, attention)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, real):
        x = x + self.drop(self.attn(self.norm1(x), real))
        return x + self.drop(self.mlp(self.norm2(x)))


class LRAClassifier(nn.Module):
    def __init__(self, *, vocab: int, classes: int, seq_len: int, dim: int, heads: int, depth: int, mlp_dim: int,
                 attention: str, dropout: float = 0.0, linformer_k: int = LINFORMER_K, block_size: int = 128,
                 pair: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq_len, dim)
        settings = dict(seq_len=seq_len, k=linformer_k, block_size=block_size)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, build_attention(attention, **settings))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        features = 4 * dim if pair else dim
        self.towers = 2 if pair else 1  # Retrieval's two documents, both through the one tower
        self.head = nn.Sequential(nn.Linear(features, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, classes))

    def non_embedding_params(self) -> float:
        """The weights a token multiplies once each, which `repro.train.model_flops_per_token` counts at 6 FLOPs:
        all but the embeddings and the attentions' own parameters (Linformer's E and F, whose products
        `attention_flops_per_token` counts). The head multiplies once an example, over the features pooled from
        its towers, so it counts as its share of the example's tokens (seq_len a tower: those tokens/s counts)."""
        own = [*self.embed.parameters(), *self.position.parameters(), *self.head.parameters(),
               *(p for block in self.blocks for p in block.attn.attend.parameters())]
        head = sum(p.numel() for p in self.head.parameters())
        tokens = self.towers * self.position.num_embeddings  # upsample_positions keeps this the seq_len
        return sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in own) + head / tokens

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention itself, all layers, as each layer's attention counts them:
        standard attention's 12·dim·seq_len a layer, Linformer's over its k rows, block-sparse's over its kept
        blocks."""
        width = self.embed.embedding_dim
        return sum(block.attn.attend.flops_per_token(width, seq_len) for block in self.blocks)

    def encode(self, ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """`real`: which tokens are not padding; None where all are (images, and batches whose mask the host found
        all true: a mask given is used as it is, as finding out here would read it back from the device)."""
        x = self.embed(ids.long()) + self.position.weight[: ids.shape[1]]  # images' pixels come as bytes
        for block in self.blocks:
            x = block(x, real)
        x = self.norm(x)
        if real is None:
            return x.mean(1)
        weights = real.to(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # mean over real tokens

    def forward(self, input_ids, labels, real=None, input_ids2=None, real2=None):
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
