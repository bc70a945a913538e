"""The benchmarked network: the seeds' noise-conditional MLP in Flax, its FLOP count, the PyTorch twin.

Sigma is embedded by ``Linear(1, H) -> SiLU -> Linear(H, H)``, concatenated
with ``x``, then ``num_layers`` linear layers of width ``H`` with SiLU; with
PyTorch present, :class:`Net` gives the Flax network the PyTorch
reference's initial weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN, SIGMA_MAX = 0.01, 10.0
LEARNING_RATE = 1e-4
ESM_SIGMA = 0.1  # the explicit/sliced SM networks are the same MLP at a fixed sigma


class SeedMLP(nn.Module):
    """The seeds' noise-conditional MLP: ``net(concat(x, embed(sigma)))`` with SiLU."""

    dim: int
    hidden: int = 256
    num_layers: int = 4

    @nn.compact
    def __call__(self, x, sigma):
        emb = nn.silu(nn.Dense(self.hidden)(sigma[:, None]))
        emb = nn.Dense(self.hidden)(emb)
        h = jnp.concatenate([x, emb], axis=-1)
        for _ in range(self.num_layers - 1):
            h = nn.silu(nn.Dense(self.hidden)(h))
        return nn.Dense(self.dim)(h)


def layer_shapes(dim: int, hidden: int, num_layers: int) -> list:
    """``[(in, out)]`` of :class:`SeedMLP`'s linear layers in call order: the sigma embedding, then the trunk."""
    return (
        [(1, hidden), (hidden, hidden), (dim + hidden, hidden)]
        + [(hidden, hidden)] * (num_layers - 2)
        + [(hidden, dim)]
    )


def matmul_flops_per_example(dim: int, hidden: int, num_layers: int, *, train: bool) -> int:
    """Multiply-add FLOPs (2 per MAC) of :class:`SeedMLP` per example, counted by hand.

    Forward: ``2 * in * out`` per linear layer. A training step adds the
    weight gradient (``2 * in * out``) of every layer and the input gradient
    of every layer but the one reading sigma, and of the layer reading
    ``concat(x, embedding)`` only its embedding part (``2 * H * H``).
    """
    fwd = sum(2 * i * o for i, o in layer_shapes(dim, hidden, num_layers))
    if not train:
        return fwd
    not_needed = 2 * 1 * hidden + 2 * dim * hidden  # input gradients of sigma and of x
    return 3 * fwd - not_needed


def load_torch(threads: int):
    """``(torch, torch_reference)`` with ``threads`` intra-op threads, or ``None`` without PyTorch."""
    try:
        import torch
        import torch_reference
    except ImportError:
        return None
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier run in this process
        pass
    return torch, torch_reference


class Net:
    """One network in both frameworks with the same initial weights."""

    def __init__(self, dim: int, cfg: dict, tref, seed: int = 0):
        self.module = SeedMLP(dim, cfg["hidden"], cfg["layers"])
        self.torch_model, self.tref = None, tref
        if tref is not None:
            torch, ref = tref
            torch.manual_seed(seed)
            self.torch_model = ref.NoiseConditionalScoreNetwork(dim, cfg["hidden"], cfg["layers"])
            layers = ref.linear_layers(self.torch_model)
            self.params = {
                f"Dense_{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for i, (w, b) in enumerate(layers)
            }
        else:
            self.params = self.module.init(jax.random.key(seed), jnp.zeros((1, dim)), jnp.ones((1,)))["params"]

    def model_fn(self, params):
        return lambda x, sigma: self.module.apply({"params": params}, x, sigma)

    def score_fn(self, params):
        """The network at the fixed ``ESM_SIGMA``: ``x -> s(x)`` (explicit and sliced SM)."""
        return lambda x: self.module.apply({"params": params}, x, jnp.full((x.shape[0],), ESM_SIGMA, x.dtype))

    def torch_optimizer(self):
        torch, _ = self.tref
        return torch.optim.Adam(self.torch_model.parameters(), lr=LEARNING_RATE)


def data(dim: int, batch: int, seed: int = 0) -> np.ndarray:
    """Standard normal ``[batch, dim]`` float32 inputs."""
    return np.random.default_rng(seed).standard_normal((batch, dim)).astype(np.float32)


def keys(n: int = 8) -> list:
    """``n`` fixed keys, cycled through by the steppers."""
    return [jax.random.key(i) for i in range(n)]
