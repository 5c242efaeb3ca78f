"""BERT-style post-LN encoder with a pooler and sequence classifier."""

import torch
from torch import nn

from ._seed import seeded
from .vit import FeedForward, SelfAttention


class BertLayer(nn.Module):
    """Post-LN encoder layer: normalise after each residual add, as in BERT."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, ffn)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ffn: int, max_len: int, num_classes: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden)
        self.layers = nn.Sequential(*[BertLayer(hidden, heads, ffn) for _ in range(layers)])
        self.pooler = nn.Linear(hidden, hidden)
        self.pooler_act = nn.Tanh()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions 0..S-1 are a prefix of the table; slicing the weight
        # traces under fx and export, unlike building an arange from S.
        pos = self.pos_emb.weight[: input_ids.shape[1]]
        x = self.emb_norm(self.tok_emb(input_ids) + pos)
        x = self.layers(x)
        pooled = self.pooler_act(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def bert_small(
    vocab: int = 30522,
    hidden: int = 384,
    layers: int = 6,
    heads: int = 12,
    ffn: int = 1536,
    max_len: int = 512,
    num_classes: int = 2,
    seed: int = 0,
) -> Bert:
    """BERT encoder classifier on int64 ``input_ids`` [B, S] (S <= max_len), seeded init, eval mode."""
    with seeded(seed):
        model = Bert(vocab, hidden, layers, heads, ffn, max_len, num_classes)
    return model.eval()
