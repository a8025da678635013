"""Plain PyTorch architectures that model directories can name through a ``cicada.json`` factory."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """A small CNN with BatchNorm (running statistics in the checkpoint) and a linear head."""

    def __init__(self, channels: int = 3, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block = nn.Sequential(
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.stem(x)))
        out: torch.Tensor = self.head(self.pool(self.block(h)).flatten(1))
        return out


class TiedMLP(nn.Module):
    """An embedding-bag MLP whose output projection is tied to its embedding."""

    def __init__(self, vocab: int = 256, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        # A non-persistent buffer that only __init__ knows how to compute.
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * self.scale
        h = h + self.down(torch.relu(self.up(h)))
        logits: torch.Tensor = self.out(self.norm(h))
        return logits
