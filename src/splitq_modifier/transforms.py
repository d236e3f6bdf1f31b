"""Learnable invertible per-path transforms (FlatQuant-style affine form).

Each path p of a split linear (vision-outlier, text-outlier, main) gets
``P = diag(c) (A kron B)``: activations become ``(x * c) (A kron B)`` and weights
``(w / c) (A kron B)^-T``, so that the product of the two equals ``x w^T`` exactly when
nothing is quantized. Each Kronecker factor is ``U diag(sigma) V^T`` with ``U`` and ``V``
kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal`` and ``sigma > 0``
(stored as its log), so the inverse-transpose is ``U diag(1/sigma) V^T``: no matrix
inverse is ever taken.

The factor sizes of each path come from :mod:`splitq_modifier.layout` (one dense factor for
narrow paths, two or three balanced Kronecker factors for wide ones).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from splitq_modifier.layout import kron_dims
from splitq_modifier.runtime.quant import apply_kron

__all__ = [
    "InvertibleFactor",
    "PathTransform",
    "apply_kron",
    "random_orthogonal",
]


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed: Haar measure)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class InvertibleFactor(nn.Module):
    """One learnable invertible ``n x n`` matrix ``U diag(exp(log_sigma)) V^T``.

    Initialised at ``U = init`` (an orthogonal matrix; identity if None), ``V = I``,
    ``sigma = 1``. ``matrix()`` gives the matrix, ``inverse_t()`` its inverse-transpose, both
    differentiable.
    """

    def __init__(self, n: int, init: torch.Tensor | None = None):
        super().__init__()
        self.u = orthogonal(nn.Linear(n, n, bias=False))
        self.v = orthogonal(nn.Linear(n, n, bias=False))
        with torch.no_grad():
            self.u.weight = torch.eye(n) if init is None else init
            self.v.weight = torch.eye(n)
        self.log_sigma = nn.Parameter(torch.zeros(n))

    def matrix(self) -> torch.Tensor:
        """``U diag(sigma) V^T``."""
        return (self.u.weight * self.log_sigma.exp()) @ self.v.weight.T

    def inverse_t(self) -> torch.Tensor:
        """``(U diag(sigma) V^T)^-T = U diag(1/sigma) V^T``."""
        return (self.u.weight * (-self.log_sigma).exp()) @ self.v.weight.T


class PathTransform(nn.Module):
    """The transform of one path: smoothing scale ``c`` and one or two invertible factors.

    :param n: path width (number of input channels routed to this path)
    :param smooth: initial smoothing scale ``c`` (shape ``(n,)``, positive); ones if None
    :param learn_factors: when False only the smoothing scale is kept (SmoothQuant-like)
    :param rotation_seed: when given, the factors start as random rotations (so the path
        starts incoherent, as a QuIP-style rotation would leave it) instead of the identity
    :param dims: Kronecker factor sizes (product ``n``); default: the layout's choice for a
        path of width ``n`` (:func:`splitq_modifier.layout.kron_dims`)
    """

    def __init__(
        self,
        n: int,
        smooth: torch.Tensor | None = None,
        learn_factors: bool = True,
        rotation_seed: int | None = None,
        dims: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.n = n
        init = torch.ones(n) if smooth is None else smooth.detach().float().reshape(n)
        if n and not bool(torch.isfinite(init).all() and (init > 0).all()):
            raise ValueError("smoothing scales must be finite and positive")
        self.log_c = nn.Parameter(init.log())
        self.factors = nn.ModuleList()
        if n and learn_factors:
            dims = tuple(kron_dims(n, 2, balanced_only=False) if dims is None else dims)
            if math.prod(dims) != n:
                raise ValueError(f"factor sizes {list(dims)} do not multiply to the width {n}")
            g = None if rotation_seed is None else torch.Generator().manual_seed(rotation_seed)
            self.factors.extend(
                InvertibleFactor(k, None if g is None else random_orthogonal(k, g)) for k in dims
            )

    @property
    def dims(self) -> tuple[int, ...]:
        """Side of each factor (``()`` without factors)."""
        return tuple(int(f.log_sigma.numel()) for f in self.factors)

    def act_mats(self) -> list[torch.Tensor]:
        """Matrices applied to activations (Kronecker factors of ``A kron B``)."""
        return [f.matrix() for f in self.factors]

    def weight_mats(self) -> list[torch.Tensor]:
        """Matrices applied to weight rows (factors of ``(A kron B)^-T``)."""
        return [f.inverse_t() for f in self.factors]

    def transform_act(self, x: torch.Tensor) -> torch.Tensor:
        """``(x * c) (A kron B)`` on the last dim."""
        if self.n == 0:
            return x
        x = x * self.log_c.exp()
        return apply_kron(x, self.act_mats()) if len(self.factors) else x

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``(w / c) (A kron B)^-T`` on the rows of ``w`` (shape ``(d_out, n)``)."""
        if self.n == 0:
            return w
        w = w * (-self.log_c).exp()
        return apply_kron(w, self.weight_mats()) if len(self.factors) else w
