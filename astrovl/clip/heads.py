"""A CLIP with trainable projection heads on top of frozen towers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ProjectionHead", "HeadCLIP"]


class ProjectionHead(nn.Module):
    """Two-layer MLP head: ``dim -> hidden (GELU) -> dim``."""

    def __init__(self, dim: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HeadCLIP(nn.Module):
    """Wrap an open_clip model with an MLP head on each tower's output.

    Parameters
    ----------
    base : open_clip.CLIP
    embed_dim : int
    hidden : int
        Width of the hidden layer (1024 in the HubbleCLIP ablation).
    """

    def __init__(self, base: nn.Module, embed_dim: int, hidden: int = 1024):
        super().__init__()
        self.base = base
        self.image_head = ProjectionHead(embed_dim, hidden)
        self.text_head = ProjectionHead(embed_dim, hidden)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.base.logit_scale

    @property
    def visual(self) -> nn.Module:
        return self.base.visual

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_head(self.base.encode_image(image))
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text_head(self.base.encode_text(text))
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return (self.encode_image(image, normalize=True), self.encode_text(text, normalize=True),
                self.logit_scale.exp())

    def head_parameters(self):
        """Parameters of the two heads (the only trainable ones in head mode)."""
        return list(self.image_head.parameters()) + list(self.text_head.parameters())
