"""A small noise-conditional U-Net for images (channels-last, 8x8 to 32x32).

The DDPM / NCSN++ layout at toy scale: a 3x3 input convolution; per
resolution ``num_res_blocks`` residual blocks (GroupNorm -> SiLU -> Conv, the
sigma embedding added after the first convolution of every block), optional
self-attention at the resolutions listed, a strided-conv downsampling; a
middle block; the mirror path with skip concatenations and nearest-neighbour
upsampling; GroupNorm -> SiLU -> a zero-initialised 3x3 output convolution.

Sizes for 8x8 digits on a 2-core CPU (batch 128, one noise level per
example): the defaults (32 base channels, multipliers (1, 2), one block per
resolution, no attention) have 0.64M parameters and take about 0.12 s per
training step; ``channels=16`` has 0.16M and takes about 0.05 s.

Mixed precision: ``dtype=jnp.bfloat16`` runs every layer in bfloat16 with
float32 parameters (Flax's ``param_dtype``) and casts the output back to
the input's dtype, so the loss is computed in float32.

References:
    Ronneberger, Fischer & Brox, "U-Net", MICCAI 2015.
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Song et al., "Score-based generative modeling through stochastic
    differential equations", ICLR 2021 (NCSN++).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsm_jax._checks import check_positive_int
from dsm_jax.models._inputs import check_inputs
from dsm_jax.models.embeddings import LabelEmbedding, SigmaEmbedding, null_labels


class ConditionalResBlock(nn.Module):
    """``x + Conv(Dropout(SiLU(GN(Conv(SiLU(GN(x))) + Dense(emb)))))``, 1x1 conv on the skip when channels change.

    The dropout sits where DDPM and NCSN++ put it, after the second activation
    and before the second convolution; it is the identity when ``deterministic``
    or ``dropout == 0`` (no random draw, no parameters).
    """

    features: int
    groups: int
    dtype: Any = jnp.float32
    dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        norm = lambda: nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(nn.silu(norm()(x)))
        h = h + nn.Dense(self.features, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(norm()(h)))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Residual self-attention over the ``H * W`` positions, after GroupNorm."""

    num_heads: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        tokens = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(x).reshape(b, hgt * wid, c)
        out = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(tokens, tokens)
        return x + out.reshape(x.shape)


class UNet(nn.Module):
    """Noise-conditional U-Net: ``(x [B, H, W, C], sigma [B]) -> [B, H, W, C]``.

    Attributes:
        channels: base channel count (a multiple of ``groups``).
        channel_mults: channel multiplier per resolution; ``len - 1``
            downsamplings, so H and W must be divisible by ``2^(len - 1)``.
        num_res_blocks: residual blocks per resolution on the way down.
        attention_resolutions: spatial sizes (e.g. ``(4,)``) that get
            self-attention; empty for none.
        num_heads: attention heads.
        groups: GroupNorm groups.
        embedding: "fourier" or "sinusoidal" features of ``log sigma``.
        embed_dim: size of the fixed sigma features.
        zero_init_output: start the output convolution at zero.
        dtype: compute dtype of the layers (float32, or bfloat16 for mixed
            precision); the parameters are float32 either way.
        num_classes: None (unconditional; parameters unchanged) or ``K``:
            ``model(x, sigma, labels)`` with a :class:`LabelEmbedding` of
            ``labels [B]`` in ``0..K`` (``K``, the default, the null label)
            added to the sigma embedding, as :class:`NoiseConditionalMLP`.
        dropout: dropout rate in every residual block (0.1 in DDPM / NCSN++
            on CIFAR-10), active only when called with ``train=True`` and a
            ``"dropout"`` rng (``model.apply(v, x, sigma, train=True,
            rngs={"dropout": key})``, what :func:`dsm_jax.models.make_dsm_loss_fn`
            does); the default call is deterministic. No parameters: a
            ``dropout=0.0`` network is the network without dropout, bit for bit.

    Example:
        >>> model = UNet(channels=16, channel_mults=(1, 2))
        >>> x, sigma = jnp.zeros((2, 8, 8, 1)), jnp.ones(2)
        >>> params = model.init(jax.random.key(0), x, sigma)["params"]
        >>> model.apply({"params": params}, x, sigma).shape
        (2, 8, 8, 1)
    """

    channels: int = 32
    channel_mults: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    num_heads: int = 1
    groups: int = 8
    embedding: str = "fourier"
    embed_dim: int = 64
    zero_init_output: bool = True
    dtype: Any = jnp.float32
    num_classes: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        check_positive_int("channels", self.channels)
        check_positive_int("groups", self.groups)
        check_positive_int("num_res_blocks", self.num_res_blocks)
        check_positive_int("num_heads", self.num_heads)
        if self.channels % self.groups:
            raise ValueError(f"channels must be a multiple of groups={self.groups}, got {self.channels}.")
        if len(self.channel_mults) == 0:
            raise ValueError(f"channel_mults must be non-empty, got {self.channel_mults!r}.")
        for m in self.channel_mults:
            check_positive_int("channel_mults entries", m)
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a rate in [0, 1), got {self.dropout!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"x must be channels-last images [B, H, W, C], got shape {x.shape}.")
        check_inputs(x, sigma, min_ndim=4)
        factor = 2 ** (len(self.channel_mults) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1:3]} must be divisible by 2^(len(channel_mults) - 1) = {factor} "
                f"for channel_mults={tuple(self.channel_mults)}."
            )
        emb = SigmaEmbedding(4 * self.channels, self.embed_dim, self.embedding, dtype=self.dtype)(sigma)
        if self.num_classes is not None:
            check_positive_int("num_classes", self.num_classes)
            lab = null_labels(labels, x.shape[0], self.num_classes)
            emb = emb + LabelEmbedding(self.num_classes, 4 * self.channels)(lab)
        elif labels is not None:
            raise ValueError("labels were given to an unconditional model (num_classes=None).")
        block = lambda mult: ConditionalResBlock(
            self.channels * mult, self.groups, dtype=self.dtype, dropout=self.dropout, deterministic=not train
        )
        attend = lambda h: (
            AttentionBlock(self.num_heads, self.groups, dtype=self.dtype)(h)
            if h.shape[1] in self.attention_resolutions
            else h
        )
        conv = lambda features, *args, **kwargs: nn.Conv(features, *args, dtype=self.dtype, **kwargs)
        last = len(self.channel_mults) - 1

        h = conv(self.channels, (3, 3))(x)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = attend(block(mult)(h, emb))
                skips.append(h)
            if level != last:
                h = conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)

        h = block(self.channel_mults[-1])(h, emb)
        h = attend(h)
        h = block(self.channel_mults[-1])(h, emb)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = attend(block(mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb))
            if level != 0:
                b, hgt, wid, c = h.shape
                h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), method="nearest")
                h = conv(c, (3, 3))(h)

        h = nn.silu(nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(h))
        kernel_init = nn.initializers.zeros if self.zero_init_output else nn.linear.default_kernel_init
        return conv(x.shape[-1], (3, 3), kernel_init=kernel_init)(h).astype(x.dtype)
