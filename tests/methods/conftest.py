"""Fixtures shared by the method tests: small models, a CLIP ViT-B/32-shaped meta model, randomisation."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


class Block(nn.Module):
    """Transformer-block-shaped Linear layers only (names as in Hugging Face CLIP)."""

    def __init__(self, width: int, mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(width, width))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)


def tower(layers: int, width: int, mlp: int) -> nn.Module:
    t = nn.Module()
    t.encoder = nn.Module()
    t.encoder.layers = nn.ModuleList(Block(width, mlp) for _ in range(layers))
    return t


class TinyNet(nn.Module):
    """Two blocks of different widths plus an untargeted head, with a runnable forward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(12, 30), Block(12, 20)])
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            a = b.self_attn
            x = x + a.out_proj(a.q_proj(x) * torch.sigmoid(a.k_proj(x)) + a.v_proj(x))
            x = x + b.mlp.fc2(torch.tanh(b.mlp.fc1(x)))
        return self.head(x)


@pytest.fixture
def tiny_net() -> Callable[[], nn.Module]:
    """A factory of identical TinyNets (same seed), so a copy can receive a loaded adapter."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return TinyNet()

    return make


@pytest.fixture(scope="session")
def clip_b32_meta() -> nn.Module:
    """CLIP ViT-B/32 shapes on the meta device: vision 12 x (768, 3072), text 12 x (512, 2048)."""
    with torch.device("meta"):
        model = nn.Module()
        model.vision_model = tower(12, 768, 3072)
        model.text_model = tower(12, 512, 2048)
        model.visual_projection = nn.Linear(768, 512, bias=False)
        model.text_projection = nn.Linear(512, 512, bias=False)
    return model


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Give every trainable tensor random values so dW != 0 (zero-init would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def randomize_params() -> Callable[..., None]:
    return randomize
