"""The library's noise-conditional U-Net (:class:`dsm_jax.models.UNet`) written in PyTorch: the U-Net benchmark's reference.

The same layers in the same order, with the same parameter count (the
benchmark asserts it): the Fourier features of ``log sigma`` (a fixed
``W``) -> ``Linear -> SiLU -> Linear`` to ``4 C``; a 3x3 input convolution;
per resolution residual blocks ``x + Conv(SiLU(GN(Conv(SiLU(GN(x))) +
Linear(SiLU(emb)))))`` (1x1 convolution on the skip when the channels
change) with self-attention at the listed sizes, a strided 3x3
downsampling; a middle block (block, attention, block); the mirror path with
skip concatenations, nearest-neighbour upsampling and a 3x3 convolution;
GroupNorm -> SiLU -> a 3x3 output convolution. PyTorch's native layout
(NCHW), eager, as a user would write it. Only imported when torch is installed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class UNet(nn.Module):
    """``(x [B, C, H, W], sigma [B]) -> [B, C, H, W]``, the layout of :class:`dsm_jax.models.UNet` at resolution ``size``."""

    def __init__(
        self,
        in_channels: int,
        size: int,
        channels: int = 32,
        channel_mults=(1, 2),
        num_res_blocks: int = 1,
        attention_resolutions=(),
        num_heads: int = 1,
        groups: int = 8,
        embed_dim: int = 64,
    ):
        super().__init__()
        emb_dim = 4 * channels
        self.fourier_w = nn.Parameter(torch.randn(embed_dim // 2), requires_grad=False)
        self.embed = nn.Sequential(nn.Linear(embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        attend = lambda c, res: Attention(c, num_heads, groups) if res in attention_resolutions else nn.Identity()
        self.down, skips, c, res = nn.ModuleList(), [channels], channels, size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList([ResBlock(c, channels * mult, emb_dim, groups), attend(channels * mult, res)])
                )
                c = channels * mult
                skips.append(c)
            if level != len(channel_mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, groups), attend(c, res), ResBlock(c, c, emb_dim, groups)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block = ResBlock(c + skips.pop(), channels * mult, emb_dim, groups)
                self.up.append(nn.ModuleList([block, attend(channels * mult, res)]))
                c = channels * mult
            if level != 0:
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.norm_out, self.conv_out = nn.GroupNorm(groups, c), nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x, sigma):
        args = 2 * math.pi * torch.log(sigma)[:, None] * self.fourier_w[None]
        emb = self.embed(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            else:
                h = layer[1](layer[0](h, emb))
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.Conv2d):
                h = layer(F.interpolate(h, scale_factor=2, mode="nearest"))
            else:
                h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dsm_loss_log_uniform_images(model, x, sigma_min: float, sigma_max: float):
    """The library's DSM loss of the digits preset: log-uniform sigma, ``sigma^2`` weight, output divided by sigma."""
    u = torch.rand(x.shape[0])
    sigma = torch.exp(u * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    noise = torch.randn_like(x)
    s = sigma[:, None, None, None]
    score = model(x + s * noise, sigma) / s
    return (sigma**2 * 0.5 * ((score + noise / s) ** 2).sum(dim=(1, 2, 3))).mean()
