"""Linear measurement operators for inverse problems: ``y = A x + sigma_y eps``.

An operator is an immutable pytree (a frozen dataclass; passes through
``jit``/``vmap``) acting on batches:

* ``A(x)``: ``[B, *D] -> [B, *M]``, the measurement;
* ``AT(y)``: ``[B, *M] -> [B, *D]``, its exact transpose (adjoint), so
  ``<A x, y> = <x, AT y>``;
* ``pinv(y)``: the Moore-Penrose pseudo-inverse ``A^+ y`` where it is cheap
  (``has_pinv``), else ``NotImplementedError``; ``A A^+ A = A``;
* ``measure(x, key, sigma_y)``: a noisy measurement ``A x + sigma_y eps``;
* ``matrix(example_shape)``: the dense ``[M, D]`` matrix (small ``D`` only:
  one ``A`` per basis vector), for closed forms and tests.

The noise level ``sigma_y`` is not part of the operator: it is an argument of
:meth:`LinearOperator.measure` and of the posterior samplers
(:mod:`dsm_jax.samplers.inverse`), since the same operator serves any noise.

Operators:

* :class:`Mask`: keeps the entries where ``mask == 1`` (inpainting); ``y``
  has ``x``'s shape with zeros elsewhere; ``A = A^T = A^+`` (a projector).
* :class:`Downsample`: ``factor x factor`` average pooling of images
  ``[B, H, W, C]`` (super-resolution); ``A A^T = I / factor^2``, so
  ``A^+ = factor^2 A^T`` is nearest-neighbour upsampling.
* :class:`GaussianBlur`: a separable Gaussian blur of images ``[B, H, W, C]``
  with ``"reflect"`` (``jnp.pad`` ``mode="reflect"``: mirrored about the edge
  pixel, which is not repeated) or ``"zero"`` padding (deblurring); the
  output has the input's size. ``A^T`` is ``jax.linear_transpose`` of ``A``:
  exact for either padding (with zero padding and this symmetric kernel the
  matrix is symmetric; with reflect padding it is not). No ``pinv`` (the blur
  is ill-conditioned).
* :class:`MatrixOperator` (and :func:`random_projection`): a dense ``[M, D]``
  matrix on flattened examples (compressed sensing); ``pinv`` by
  ``jnp.linalg.pinv`` (cheap for small ``D``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dsm_jax._checks import (
    check_batched,
    check_choice,
    check_finite,
    check_key,
    check_positive_int,
    check_positive_number,
    is_concrete,
)
from dsm_jax._utils import dataclass_transform, to_batch_expanded

__all__ = [
    "BLUR_PADDINGS",
    "Downsample",
    "GaussianBlur",
    "LinearOperator",
    "Mask",
    "MatrixOperator",
    "gaussian_kernel",
    "random_projection",
]

BLUR_PADDINGS = ("reflect", "zero")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _pytree(cls):
    """A frozen dataclass registered as a JAX pytree; fields made by :func:`_static` are metadata."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


def _static(default: Any = dataclasses.MISSING) -> Any:
    """A static (non-leaf) field: part of the tree structure, hashed by ``jit``."""
    return dataclasses.field(default=default, metadata=dict(static=True))


def _user_array(value) -> bool:
    """Values a user passed (validated), not the tracers or placeholders pytree machinery rebuilds with."""
    return isinstance(value, (np.ndarray, jax.Array, list, tuple)) and is_concrete(value)


def _check_images(name: str, x) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name} must be images [B, H, W, C], got shape {jnp.shape(x)}.")


class LinearOperator:
    """Base class of the measurement operators (see the module docstring)."""

    has_pinv: ClassVar[bool] = False

    def A(self, x: jax.Array) -> jax.Array:
        """The measurement ``A x``: ``[B, *D] -> [B, *M]``."""
        raise NotImplementedError

    def AT(self, y: jax.Array) -> jax.Array:
        """The transpose ``A^T y``: ``[B, *M] -> [B, *D]``."""
        raise NotImplementedError

    def pinv(self, y: jax.Array) -> jax.Array:
        """The pseudo-inverse ``A^+ y``: ``[B, *M] -> [B, *D]`` (only when ``has_pinv``)."""
        raise NotImplementedError(f"{type(self).__name__} has no cheap pseudo-inverse.")

    def measure(self, x: jax.Array, key: jax.Array, sigma_y=0.0) -> jax.Array:
        """A noisy measurement ``A x + sigma_y eps``, ``eps ~ N(0, I)``; ``sigma_y`` a scalar or ``[B]``, ``>= 0``."""
        check_batched("x", x)
        check_key(key)
        if is_concrete(sigma_y) and not np.all(np.asarray(sigma_y) >= 0):
            raise ValueError(f"sigma_y must be >= 0, got {sigma_y!r}.")
        y = self.A(x)
        return y + to_batch_expanded(sigma_y, y) * jax.random.normal(key, y.shape, y.dtype)

    def matrix(self, example_shape, dtype=jnp.float32) -> jax.Array:
        """The dense matrix ``[M, D]`` of ``A`` on flattened examples of shape ``example_shape``."""
        shape = tuple(example_shape)
        dim = math.prod(shape)
        basis = jnp.eye(dim, dtype=dtype).reshape((dim,) + shape)
        return self.A(basis).reshape(dim, -1).T


@_pytree
class Mask(LinearOperator):
    """Observes the entries where ``mask == 1``: ``A x = mask * x`` (inpainting).

    ``A`` is an orthogonal projector, so ``A^T = A^+ = A``; the measurement has
    ``x``'s shape, with zeros where nothing is observed.

    Args:
        mask: 0/1 array of one example's shape ``[*D]`` (or broadcastable to it).
    """

    mask: jax.Array
    has_pinv: ClassVar[bool] = True

    def __post_init__(self):
        if _user_array(self.mask):
            m = np.asarray(self.mask)
            if m.ndim == 0 or not np.all((m == 0) | (m == 1)):
                raise ValueError(f"mask must be an array of 0 (unknown) and 1 (known) entries, got {self.mask!r}.")

    def _m(self, x):
        return jnp.asarray(self.mask, x.dtype)

    def A(self, x):
        return self._m(x) * x

    def AT(self, y):
        return self._m(y) * y

    def pinv(self, y):
        return self._m(y) * y


@_pytree
class Downsample(LinearOperator):
    """``factor x factor`` average pooling of images ``[B, H, W, C]`` (super-resolution).

    ``A^T y`` spreads each low-resolution pixel over its block with weight
    ``1 / factor^2``; ``A A^T = I / factor^2``, so ``A^+ = factor^2 A^T``
    (nearest-neighbour upsampling). ``H`` and ``W`` must be multiples of ``factor``.

    Args:
        factor: the pooling factor, an integer ``>= 1``.
    """

    factor: int = _static()
    has_pinv: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_int("factor", self.factor)

    def A(self, x):
        _check_images("x", x)
        b, h, w, c = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"the image size {h}x{w} must be a multiple of factor={f}.")
        return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

    def pinv(self, y):
        _check_images("y", y)
        return jnp.repeat(jnp.repeat(y, self.factor, axis=1), self.factor, axis=2)

    def AT(self, y):
        return self.pinv(y) / self.factor**2


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """The normalised 1-D Gaussian kernel ``exp(-i^2 / (2 sigma^2))``, ``i = -radius .. radius``."""
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (i / sigma) ** 2)
    return k / k.sum()


@_pytree
class GaussianBlur(LinearOperator):
    """A separable Gaussian blur of images ``[B, H, W, C]``, the same size out (deblurring).

    Each channel is convolved along ``H`` then ``W`` with
    :func:`gaussian_kernel` ``(sigma, radius)``, after padding by ``radius``:
    ``"reflect"`` mirrors about the edge pixel (``jnp.pad`` ``mode="reflect"``:
    ``[c b | a b c | b a]``), ``"zero"`` pads with zeros (the blur then loses
    mass at the border). ``A^T`` is ``jax.linear_transpose`` of ``A``, exact
    for both paddings. No pseudo-inverse.

    Args:
        sigma: the kernel's standard deviation in pixels, ``> 0``.
        radius: the kernel's half-width (default ``ceil(3 sigma)``); with
            reflect padding it must be smaller than ``H`` and ``W``.
        padding: "reflect" or "zero".
    """

    sigma: float = _static()
    radius: int | None = _static(None)
    padding: str = _static("reflect")

    def __post_init__(self):
        check_positive_number("sigma", self.sigma)
        check_choice("padding", self.padding, BLUR_PADDINGS)
        if self.radius is not None:
            check_positive_int("radius", self.radius, minimum=0)

    @property
    def kernel(self) -> np.ndarray:
        radius = math.ceil(3.0 * self.sigma) if self.radius is None else self.radius
        return gaussian_kernel(float(self.sigma), radius)

    def _blur_axis(self, x, axis: int, kernel: np.ndarray):
        r = (kernel.size - 1) // 2
        if self.padding == "reflect" and r >= x.shape[axis]:
            raise ValueError(f"reflect padding needs radius < the image size {x.shape[axis]}, got radius={r}.")
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = jnp.pad(x, pad, mode="reflect" if self.padding == "reflect" else "constant")
        n = x.shape[axis]
        return sum(float(k) * jax.lax.slice_in_dim(xp, j, j + n, axis=axis) for j, k in enumerate(kernel))

    def A(self, x):
        _check_images("x", x)
        kernel = self.kernel
        return self._blur_axis(self._blur_axis(x, 1, kernel), 2, kernel)

    def AT(self, y):
        _check_images("y", y)
        return jax.linear_transpose(self.A, jax.ShapeDtypeStruct(y.shape, y.dtype))(y)[0]


@_pytree
class MatrixOperator(LinearOperator):
    """A dense matrix on flattened examples: ``A x = W vec(x)``, ``W: [M, D]``, ``y: [B, M]``.

    ``pinv`` is ``jnp.linalg.pinv(W)`` applied to ``y`` (an SVD of ``W`` per
    call: meant for small ``D``).

    Args:
        weights: ``[M, D]``.
        input_shape: one example's shape ``[*D]`` with ``prod(*D) = D`` (default ``(D,)``).
    """

    weights: jax.Array
    input_shape: tuple | None = _static(None)
    has_pinv: ClassVar[bool] = True

    def __post_init__(self):
        if jnp.ndim(self.weights) != 2:
            raise ValueError(f"weights must be a matrix [M, D], got shape {jnp.shape(self.weights)}.")
        if _user_array(self.weights):
            check_finite("weights", self.weights)
        if self.input_shape is not None and math.prod(self.input_shape) != jnp.shape(self.weights)[1]:
            raise ValueError(
                f"input_shape {self.input_shape} must hold D={jnp.shape(self.weights)[1]} entries per example."
            )

    def _shape(self):
        return (jnp.shape(self.weights)[1],) if self.input_shape is None else tuple(self.input_shape)

    def A(self, x):
        check_batched("x", x)
        if tuple(x.shape[1:]) != self._shape():
            raise ValueError(f"x must have examples of shape {self._shape()}, got shape {x.shape}.")
        return x.reshape(x.shape[0], -1) @ jnp.asarray(self.weights, x.dtype).T

    def AT(self, y):
        return (y @ jnp.asarray(self.weights, y.dtype)).reshape((y.shape[0],) + self._shape())

    def pinv(self, y):
        return (y @ jnp.linalg.pinv(jnp.asarray(self.weights, y.dtype)).T).reshape((y.shape[0],) + self._shape())


def random_projection(key: jax.Array, num_measurements: int, input_shape) -> MatrixOperator:
    """A Gaussian random projection: ``W_ij ~ N(0, 1 / D)``, ``[num_measurements, D]`` (compressed sensing).

    Args:
        key: PRNG key.
        num_measurements: ``M >= 1``.
        input_shape: one example's shape ``[*D]``.
    """
    check_key(key)
    m = check_positive_int("num_measurements", num_measurements)
    shape = tuple(int(s) for s in input_shape)
    d = math.prod(shape)
    return MatrixOperator(jax.random.normal(key, (m, d)) / math.sqrt(d), shape)
