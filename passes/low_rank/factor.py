"""The numerics of the low_rank pass: weighted truncated SVD, and the exact error of every rank.

Every method factors a weighted weight matrix ``L · W · R = U Σ Vᵀ`` and un-weights the factors:

- ``svd``:              L = I, R = I (plain truncated SVD; minimises the weight error ‖W − W_r‖_F).
- ``activation_aware``: L = I, R = S with S Sᵀ = C, the (damped) second moment of the layer's inputs
  (``whitening="cholesky"``, as in SVD-LLM; truncating W·S minimises the output error ‖(W − W_r) Xᵀ‖_F),
  or R = diag(mean|x|^α) (``whitening="scale"``, as in ASVD).
- ``fisher``:           L = diag(√I_row), I_row the summed squared loss gradients of each output row
  (FWSVD); R = I.

``W`` is the layer weight as a matrix ``[out, d]`` (d = in_features, or in_channels·kh·kw for a conv,
whose inputs are then its im2col patches). The truncation at rank r is ``W_r = P[:, :r] @ Q[:r]`` with
``P = L⁻¹ U Σ^½`` and ``Q = Σ^½ Vᵀ R⁻¹`` (balanced, so both factors have similar scale).

Because ``W − W_r = P[:, r:] Q[r:]``, the output error on the calibration inputs at *every* rank comes
from two k×k Gram matrices: ``‖(W − W_r) Xᵀ‖² / n = Σ_{i,j≥r} (PᵀP ∘ Q C Qᵀ)_ij``. So rank selection
measures each layer's true output error at all candidate ranks for the price of one SVD.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("svd", "activation_aware", "fisher")
WHITENINGS = ("cholesky", "scale")


@dataclass
class LayerStats:
    """Calibration statistics of one layer's input (and, for fisher, its weight's gradients)."""

    d: int
    n: int = 0
    xtx: torch.Tensor | None = None  # Σ x xᵀ over calibration rows, float64 [d, d]
    abs_sum: torch.Tensor | None = None  # Σ |x| per input feature, float64 [d]
    norm4_sum: float = 0.0  # Σ ‖x‖⁴ over rows (for the Ledoit–Wolf shrinkage of the second moment)
    grad_sq: torch.Tensor | None = None  # Σ (∂loss/∂W)² over samples, float64 [out, d]

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, self.d).double()
        if self.xtx is None:
            self.xtx = torch.zeros(self.d, self.d, dtype=torch.float64)
            self.abs_sum = torch.zeros(self.d, dtype=torch.float64)
        self.xtx += rows.T @ rows
        self.abs_sum += rows.abs().sum(0)
        self.norm4_sum += float(rows.square().sum(1).square().sum())
        self.n += rows.shape[0]

    @property
    def second_moment(self) -> torch.Tensor | None:
        return self.xtx / self.n if self.n else None

    def shrinkage(self) -> float:
        """Ledoit–Wolf weight α of the target μI in (1 − α)·C + α·μI (0: C is well estimated).

        α = min(1, E‖x xᵀ − C‖²_F / n  /  ‖C − μI‖²_F), with μ = tr(C)/d; the numerator needs only
        Σ‖x‖⁴, since Σ‖x xᵀ − C‖² = Σ‖x‖⁴ − n‖C‖². Few rows for many features (a pooler that sees one
        token per sequence) give α near 1, and the whitening falls back towards plain SVD.
        """
        if not self.n:
            return 1.0
        C = self.second_moment
        mu = float(torch.diagonal(C).mean())
        c2 = float(C.square().sum())
        num = max(self.norm4_sum / self.n - c2, 0.0) / self.n
        den = c2 - 2 * mu * float(torch.diagonal(C).sum()) + mu * mu * self.d  # ‖C − μI‖²
        lw = 1.0 if den <= 0 else min(1.0, num / den)
        # Ledoit–Wolf assumes spread-out samples; rows that are all near one vector (the [CLS]
        # position: the same position embedding every time) fool it. With fewer than 2 rows per
        # feature, at least d / 2n of the identity goes in regardless.
        return max(lw, min(1.0, self.d / (2.0 * self.n)))


@dataclass
class Factorization:
    """All ranks of one layer's decomposition at once."""

    P: torch.Tensor  # [out, k] float64
    Q: torch.Tensor  # [k, d]  float64
    sigma: torch.Tensor  # [k] singular values of the weighted matrix (the method's spectrum)
    err_sq: torch.Tensor  # [k+1]: mean squared output error on calibration inputs at rank r (r = 0..k)
    total_sq: float  # mean squared output (rank-0 error)
    method: str
    notes: list[str] = field(default_factory=list)

    @property
    def full_rank(self) -> int:
        return int(self.sigma.numel())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [out, r], right [r, d]) with left @ right = W_r."""
        return self.P[:, :rank], self.Q[:rank]

    def rel_error(self, rank: int) -> float:
        """Relative output error ‖(W − W_r)X‖ / ‖W X‖ on the calibration inputs (bias excluded)."""
        if self.total_sq <= 0:
            return 0.0
        return float(self.err_sq[min(rank, self.full_rank)].clamp_min(0) / self.total_sq) ** 0.5

    def energy(self, rank: int) -> float:
        s2 = self.sigma.square()
        tot = float(s2.sum())
        return float(s2[:rank].sum()) / tot if tot > 0 else 1.0

    def rank_for_energy(self, energy: float) -> int:
        s2 = self.sigma.square()
        tot = float(s2.sum())
        if tot <= 0:
            return 0
        cum = torch.cumsum(s2, 0) / tot
        return int(torch.searchsorted(cum, torch.tensor(min(energy, 1.0) - 1e-12, dtype=cum.dtype)).item()) + 1


def _damped(c: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    scale = float(torch.diagonal(c).mean()) if c.numel() else 0.0
    if scale <= 0:
        scale = 1.0
    return c + damping * scale * torch.eye(c.shape[0], dtype=c.dtype), scale


def _cholesky(c: torch.Tensor, damping: float, notes: list[str]) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = C + λI; λ grows until the factorisation succeeds."""
    lam = damping
    for _ in range(8):
        cd, _ = _damped(c, lam)
        s, info = torch.linalg.cholesky_ex(cd)
        if int(info) == 0:
            if lam != damping:
                notes.append(f"raised whitening damping to {lam:g} (second moment not positive definite)")
            return s
        lam = max(lam * 10, 1e-8)
    raise torch.linalg.LinAlgError("second moment of the layer inputs could not be factorised")


def factorize(weight: torch.Tensor, stats: LayerStats | None, method: str = "svd", *,
              whitening: str = "cholesky", damping: float = 1e-2, alpha: float = 0.5,
              fisher_floor: float = 1e-2, shrink: bool = True) -> Factorization:
    """Decompose ``weight`` ([out, d]) with ``method``; errors are measured with ``stats``' inputs.

    With no input statistics the error metric falls back to the weight error (C = I).
    """
    if method not in METHODS:
        raise ValueError(f"unknown low_rank method {method!r}; choose one of {', '.join(METHODS)}")
    W = weight.detach().double().reshape(weight.shape[0], -1)
    out, d = W.shape
    notes: list[str] = []
    C = stats.second_moment if stats is not None and stats.n else None
    left = right = None  # L as a vector (diag), R as a matrix or vector
    if method == "activation_aware":
        if C is None:
            raise ValueError("activation_aware needs calibration inputs")
        if whitening == "cholesky":
            alpha_lw = stats.shrinkage() if shrink else 0.0
            if alpha_lw > 0:
                mu = float(torch.diagonal(C).mean())
                C_w = (1 - alpha_lw) * C + alpha_lw * mu * torch.eye(d, dtype=C.dtype)
            else:
                C_w = C
            right = _cholesky(C_w, damping, notes)
        elif whitening == "scale":
            s = (stats.abs_sum / stats.n).clamp_min(1e-12) ** alpha
            right = s / s.mean()
        else:
            raise ValueError(f"unknown whitening {whitening!r}; choose one of {', '.join(WHITENINGS)}")
    elif method == "fisher":
        if stats is None or stats.grad_sq is None:
            raise ValueError("fisher needs squared gradients (a loss on calibration batches)")
        row = stats.grad_sq.reshape(out, -1).sum(1)
        mean = float(row.mean())
        if mean <= 0:
            notes.append("all gradients were zero; fisher weighting fell back to plain SVD")
            row = torch.ones_like(row)
        else:
            # Rows whose gradients were ~0 on the calibration data (e.g. dead ReLU units) still keep a
            # floor weight, so their reconstruction cannot drift far enough to wake them up.
            row = row / mean + fisher_floor
        left = row.sqrt()

    Wt = W
    if left is not None:
        Wt = left[:, None] * Wt
    if right is not None:
        Wt = Wt @ right if right.dim() == 2 else Wt * right[None, :]
    U, sig, Vh = torch.linalg.svd(Wt, full_matrices=False)
    rs = sig.clamp_min(0).sqrt()
    P = U * rs[None, :]
    Q = rs[:, None] * Vh
    if left is not None:
        P = P / left[:, None]
    if right is not None:
        if right.dim() == 2:
            Q = torch.linalg.solve_triangular(right, Q, upper=False, left=False)  # Q S⁻¹
        else:
            Q = Q / right[None, :]

    # Exact output error at every rank from two Gram matrices (see module docstring).
    Cm = C if C is not None else torch.eye(d, dtype=torch.float64)
    M = (P.T @ P) * (Q @ Cm @ Q.T)
    k = M.shape[0]
    suffix = M.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1)  # suffix[r, r] = Σ_{i,j≥r} M_ij
    err = torch.zeros(k + 1, dtype=torch.float64)
    err[:k] = torch.diagonal(suffix)
    total = float(torch.einsum("od,de,oe->", W, Cm, W))
    return Factorization(P=P, Q=Q, sigma=sig, err_sq=err.clamp_min(0), total_sq=max(total, 0.0),
                         method=method, notes=notes)
