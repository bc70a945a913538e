"""The PyTorch code a user would otherwise write: the benchmarks' reference.

Eager PyTorch on the CPU, written the way the seed documents write it: a
noise-conditional MLP (an embedding MLP of the raw sigma, concatenated with
``x``, then ``num_layers`` linear layers with SiLU), the log-uniform-sigma DSM
trainer with ``sigma^2`` weighting and Adam, a Python loop over noise levels
for the multi-scale loss, the exact Jacobian trace by one autograd backward
pass per dimension, and annealed Langevin dynamics as two nested Python loops.

Only imported when torch is installed (the optional ``bench`` extra).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class NoiseConditionalScoreNetwork(nn.Module):
    """``s(x, sigma)``: ``net(concat(x, embed(sigma)))``, ``embed = Linear -> SiLU -> Linear``."""

    def __init__(self, dim: int, hidden_dim: int = 256, num_layers: int = 4):
        super().__init__()
        self.noise_embed = nn.Sequential(nn.Linear(1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        layers = [nn.Linear(dim + hidden_dim, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, sigma):
        sigma = sigma.view(-1, 1) if sigma.dim() == 1 else sigma
        h = torch.cat([x, self.noise_embed(sigma).expand(x.shape[0], -1)], dim=-1)
        return self.net(h)


def linear_layers(model: NoiseConditionalScoreNetwork) -> list:
    """``[(weight [out, in], bias [out])]`` as numpy, embedding layers first, in call order."""
    mods = [m for m in list(model.noise_embed) + list(model.net) if isinstance(m, nn.Linear)]
    return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in mods]


def dsm_loss_log_uniform(model, x, sigma_min: float, sigma_max: float):
    """The seed's DSM trainer loss: per-example log-uniform sigma, ``sigma^2``-weighted."""
    u = torch.rand(x.shape[0], device=x.device)
    sigma = torch.exp(u * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).view(-1, 1)
    noise = torch.randn_like(x)
    score = model(x + sigma * noise, sigma)
    return (sigma**2 * ((score + noise / sigma) ** 2).sum(dim=-1)).mean()


def multiscale_loss_loop(model, x, sigmas):
    """Every example at every level, one level after the other (a Python loop)."""
    total = 0.0
    for sigma in sigmas:
        noise = torch.randn_like(x)
        score = model(x + sigma * noise, torch.full((x.shape[0], 1), sigma))
        total = total + sigma**2 * ((score + noise / sigma) ** 2).sum(dim=-1).mean()
    return total / len(sigmas)


def explicit_sm_loss(model, x, sigma: float):
    """``mean(tr(ds/dx) + 1/2 |s|^2)`` with the trace by one autograd backward per dimension."""
    x = x.detach().requires_grad_(True)
    s = model(x, torch.full((x.shape[0], 1), sigma))
    trace = torch.zeros(x.shape[0])
    for i in range(x.shape[1]):
        (g,) = torch.autograd.grad(s[:, i].sum(), x, create_graph=True)
        trace = trace + g[:, i]
    return (trace + 0.5 * (s**2).sum(dim=-1)).mean()


def train_step(model, optimizer, loss_fn, *args) -> float:
    """zero_grad, loss, backward, step; returns the loss as a float (a host sync, as users write it)."""
    optimizer.zero_grad()
    loss = loss_fn(model, *args)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def annealed_langevin(model, x, sigmas, steps_per_sigma: int, eps: float):
    """Song & Ermon's Algorithm 1: ``x <- x + alpha/2 s(x, sigma) + sqrt(alpha) z``, Python loops."""
    for sigma in sigmas:
        alpha = eps * (sigma / sigmas[-1]) ** 2
        for _ in range(steps_per_sigma):
            score = model(x, torch.full((x.shape[0], 1), sigma))
            x = x + (alpha / 2) * score + np.sqrt(alpha) * torch.randn_like(x)
    return x
