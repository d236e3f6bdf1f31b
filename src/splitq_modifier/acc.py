"""ACC: adaptive cross-modal calibration of the main path with gated low-rank branches.

Both branches share one parameterisation (paper section 4.3): the truncated
SVD of the transformed main weight ``W~ = U S V^T`` is computed once and frozen; only a gate
``g`` (one value per kept singular direction) is learned, so a branch is
``B(g) = U_r diag(g) S_r V_r^T``. It runs as two quantized factors: ``down = sqrt(S_r) V_r^T``
(``r x k_main``) and ``up = U_r diag(g sqrt(S_r))`` (``d_out x r``). Splitting ``S`` evenly keeps
the rank-``r`` intermediate balanced for its per-token quantizer; the gate sits on ``up``.

- CWS (cross-modal weight smoothing): the main weight becomes ``W_res = W~ - B(g_c)``; the
  branch computes ``Q(Q(X~) down^T) up^T``, its factors and intermediate at >= 4 bits.
- MAC (modality-specific activation compensation): a text-only branch added to text-token
  rows. ``input="residual"`` (default) feeds it the activation quantization error
  ``E = X~ - Q(X~)`` so that it restores ``E W~^T``; ``input="act"`` feeds it ``Q(X~)`` with the
  gate initialised at 0, i.e. a learned text-only weight correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from splitq_modifier.quant import fake_quant, quantize_sym, step_cached

__all__ = ["QuantBranch", "LowRankBranch", "FrozenBranch", "branch_rank", "top_singular"]


@dataclass(frozen=True)
class FrozenBranch:
    """A calibrated branch of one linear: int8 codes and fp32 per-row scales of ``down``
    (``r x k``) and ``up`` (``d_out x r``, gate folded in), at ``bits``; the runtime packs the
    branches of a site's linears together (:class:`splitq_modifier.runtime.SiteBranch`)."""

    down_int: torch.Tensor
    down_scale: torch.Tensor
    up_int: torch.Tensor
    up_scale: torch.Tensor
    bits: int
    input: str = "residual"


@dataclass(frozen=True)
class QuantBranch:
    """Configuration of one low-rank branch.

    :param rank_ratio: rank as a fraction of the main weight's full rank (``min(d_out, k)``)
    :param bits: bits of the factors and of the branch's hidden activations (the paper's
        4-bit floor: ``SplitQSettings.branch_bits``)
    :param learn_gate: learn the gate (False = the paper's fixed-SVD appendix ablation)
    :param input: what the branch reads (MAC only; CWS always reads ``Q(X~)``):
        ``"residual"`` or ``"act"``
    """

    rank_ratio: float
    bits: int = 4
    learn_gate: bool = True
    input: Literal["residual", "act"] = "residual"


def branch_rank(ratio: float, d_out: int, k: int) -> int:
    """Rank of a branch: ``ceil(ratio * min(d_out, k))``, at least 1."""
    return max(1, math.ceil(ratio * min(d_out, k)))


#: Matrices with both sides above this use a randomized truncated SVD.
EXACT_SVD_MAX = 512


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of tall ``y`` (float64) by Cholesky-QR, twice
    (matmul-bound; LAPACK's Householder QR of a tall matrix is orders of magnitude slower
    on some CPU builds)."""
    for _ in range(2):
        g = y.T @ y
        g = g + torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * (
            1e-12 * g.diagonal().mean()
        )
        y = torch.linalg.solve_triangular(torch.linalg.cholesky(g), y.T, upper=False).T
    return y


def top_singular(
    w: torch.Tensor, r: int, seed: int = 0, niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` leading singular triplets ``(U_r, S_r, V_r^T)`` of ``w`` (fp32).

    Small matrices use the exact SVD. Wider ones (a 3584 x 18944 projection takes minutes
    and several full-size workspaces for a full SVD on CPU) use randomized subspace
    iteration: ``r + 16`` seeded Gaussian probes, ``niter`` power iterations, each
    orthonormalised by Cholesky-QR, then the SVD of the small projected matrix. The branch
    only needs a good rank-``r`` subspace: CWS takes the branch out of the weight exactly
    (``W_res = W~ - B``), so an approximate subspace costs captured energy, never
    correctness. Deterministic for a given ``seed``.
    """
    if min(w.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    q = min(r + 16, min(w.shape))
    g = torch.Generator(device="cpu").manual_seed(seed)
    wf = w.float()
    y = wf @ torch.randn(w.shape[1], q, generator=g).to(w.device)
    y = _orthonormalize(y.double())
    for _ in range(niter):
        y = _orthonormalize((wf @ (wf.T @ y.float())).double())
    b = y.float().T @ wf  # (q, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (y.float() @ ub)[:, :r], s[:r], vh[:r]


def _branch(
    u: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    bits: int,
    quantize: bool,
    quantize_input: bool,
) -> torch.Tensor:
    """``Q(Q(u) down^T) up^T``: (quantize the input,) project down, quantize, project up."""
    if quantize and quantize_input:
        u = fake_quant(u, bits)
    h = u @ down.T
    if quantize:
        h = fake_quant(h, bits)
    return h @ up.T


def _text_only(dy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of non-text tokens (no mask = every token is text, as at decode)."""
    return dy if mask is None else dy * mask.unsqueeze(-1).to(dy.dtype)


def _mac_input(kind: str, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return xs - xq if kind == "residual" else xq


class LowRankBranch(nn.Module):
    """A gated low-rank branch built from the SVD of a (transformed) main weight.

    :param w_main: the transformed main-path weight ``W~`` (``d_out x k``), used once for SVD
    :param cfg: rank, bits, gate and input settings
    :param svd: leading singular triplets of ``w_main`` already computed (at least the rank);
        CWS and MAC of one linear share one decomposition
    """

    def __init__(
        self,
        w_main: torch.Tensor,
        cfg: QuantBranch,
        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not 2 <= cfg.bits <= 8:
            raise ValueError(f"low-rank branches use 2 to 8 bits, got {cfg.bits}")
        self.cfg = cfg
        w = w_main.detach().float()
        r = branch_rank(cfg.rank_ratio, *w.shape)
        if svd is None or svd[1].numel() < r:
            svd = top_singular(w, r)
        u, s, vh = svd[0][:, :r], svd[1][:r], svd[2][:r]
        root = s.sqrt()
        self.register_buffer("u_r", (u * root).contiguous())
        self.register_buffer("down", (root[:, None] * vh).contiguous())
        gate0 = 0.0 if cfg.input == "act" else 1.0
        self.gate = nn.Parameter(torch.full((r,), gate0), requires_grad=cfg.learn_gate)

    @property
    def rank(self) -> int:
        """Number of singular directions kept."""
        return self.gate.numel()

    def up(self) -> torch.Tensor:
        """``U_r diag(g sqrt(S_r))``."""
        return self.u_r * self.gate

    def weight(self) -> torch.Tensor:
        """The dense branch ``B(g) = up @ down`` (what CWS takes out of the main weight)."""
        return self.up() @ self.down

    def _factors(self, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            down, up = self.down, self.up()
            if quantize:
                down, up = fake_quant(down, self.cfg.bits), fake_quant(up, self.cfg.bits)
            return down, up

        return step_cached((id(self), "factors", quantize), compute)

    def forward(self, xq_main: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """CWS: the branch output for the (quantized) transformed main activation."""
        down, up = self._factors(quantize)
        return _branch(xq_main, down, up, self.cfg.bits, quantize, False)

    def text_compensation(
        self,
        xs_main: torch.Tensor,
        xq_main: torch.Tensor,
        context,
        quantize: bool = True,
        u_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MAC: the compensation added to text-token rows.

        :param u_q: the branch input, already (fake-)quantized (the linears of a site share
            it); computed from ``xs_main`` / ``xq_main`` when None
        """
        mask = None if context is None else context.mask_for(xs_main)
        down, up = self._factors(quantize)
        if u_q is None:
            u_q = self.mac_input(xs_main, xq_main, quantize)
        return _text_only(_branch(u_q, down, up, self.cfg.bits, quantize, False), mask)

    def mac_input(self, xs_main: torch.Tensor, xq_main: torch.Tensor, quantize: bool):
        """The (fake-)quantized MAC branch input: residual ``X~ - Q(X~)`` or ``Q(X~)``."""
        u = _mac_input(self.cfg.input, xs_main, xq_main)
        return fake_quant(u, self.cfg.bits) if quantize else u

    @torch.no_grad()
    def freeze(self) -> FrozenBranch:
        """Integer factors with the gate folded into ``up``."""
        d_int, d_scale = quantize_sym(self.down, self.cfg.bits)
        u_int, u_scale = quantize_sym(self.up(), self.cfg.bits)
        return FrozenBranch(
            down_int=d_int.to(torch.int8),
            down_scale=d_scale.squeeze(1).float(),
            up_int=u_int.to(torch.int8),
            up_scale=u_scale.squeeze(1).float(),
            bits=self.cfg.bits,
            input=self.cfg.input,
        )
