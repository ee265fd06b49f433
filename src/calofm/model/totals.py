"""Shower totals: a shower's hit count and visible energy, drawn before its first hit.

A next-hit model sets a shower's totals only through its stop decision and the energies it draws
one by one; small errors in each add up to a spread of the response several times Geant4's. The
totals model learns their joint distribution given the conditions, a two-dimensional Gaussian
mixture in (log hits, log visible MeV), and the transformer is conditioned on the drawn totals at
every position, so each shower is generated to have them (the two-stage design of the field's
flows, which first learn the energy per layer and then the shower given it).

One small network per class, routed like the experts: a new class adds its own network, so the
totals of the classes already learned never change.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from calofm.model.experts import Routing, RowRouted

# Parameters per mixture component: one weight logit, two means, three Cholesky entries.
_PER_COMPONENT = 6
_MIN_LOG_SCALE = -7.0


class TotalsNet(nn.Module):
    """One class's network, predicting in units where that class's totals are of order one."""

    def __init__(self, n_features: int, hidden: int, components: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, components * _PER_COMPONENT),
        )
        # Mean and spread of the class's points (log hits, log MeV), set when it is fitted.
        self.register_buffer("center", torch.zeros(2))
        self.register_buffer("spread", torch.ones(2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class ShowerTotals(nn.Module, RowRouted):
    """P(log hits, log visible MeV | conditions, class) as a Gaussian mixture per class."""

    def __init__(self, n_classes: int, n_features: int, hidden: int = 64, components: int = 8):
        super().__init__()
        self.n_features, self.hidden, self.components = n_features, hidden, components
        self.nets = nn.ModuleList(self._net() for _ in range(n_classes))

    def _net(self) -> TotalsNet:
        return TotalsNet(self.n_features, self.hidden, self.components)

    def add(self, init_from: int | None = None) -> TotalsNet:
        """Append a class's network: a copy of ``init_from``'s, or freshly initialised."""
        ref = self.nets[0].center
        net = self._net().to(device=ref.device)
        if init_from is not None:
            net.load_state_dict(self.nets[init_from].state_dict())
        self.nets.append(net)
        return net

    def mixture(
        self, features: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log weights (B, K), means (B, K, 2) and lower Cholesky factors (B, K, 2, 2)."""

        def one_class(c: int, rows: torch.Tensor) -> torch.Tensor:
            net = self.nets[c]
            out = net(rows).float().view(len(rows), self.components, _PER_COMPONENT)
            mean = net.center + net.spread * out[..., 1:3]
            s1, s2 = (out[..., 3:5].clamp(min=_MIN_LOG_SCALE).exp() * net.spread).unbind(-1)
            off = out[..., 5] * net.spread[1]  # the Cholesky factor of D L for D = diag(spread)
            return torch.cat([out[..., :1], mean, torch.stack([s1, off, s2], -1)], -1)

        out = routing.by_class.apply(features, one_class)
        log_w = torch.log_softmax(out[..., 0], dim=-1)
        s1, off, s2 = out[..., 3], out[..., 4], out[..., 5]
        zero = torch.zeros_like(s1)
        tril = torch.stack([torch.stack([s1, zero], -1), torch.stack([off, s2], -1)], -2)
        return log_w, out[..., 1:3], tril

    def log_prob(self, features: torch.Tensor, routing: Routing, z: torch.Tensor) -> torch.Tensor:
        """Log density (B,) of points ``z`` (B, 2) = (log hits, log visible MeV)."""
        log_w, mean, tril = self.mixture(features, routing)
        diff = (z.float()[:, None, :] - mean)[..., None]  # (B, K, 2, 1)
        white = torch.linalg.solve_triangular(tril, diff, upper=False)[..., 0]
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * (white**2).sum(-1) - log_det - math.log(2 * math.pi)
        return torch.logsumexp(log_w + log_n, dim=-1)

    @torch.no_grad()
    def sample(self, features: torch.Tensor, routing: Routing, u: torch.Tensor) -> torch.Tensor:
        """Points (B, 2) from the rows' uniforms ``u`` (B, 3): component, then two normals."""
        log_w, mean, tril = self.mixture(features, routing)
        cdf = log_w.exp().cumsum(-1)
        k = torch.searchsorted(cdf, u[:, :1].to(cdf.dtype) * cdf[:, -1:]).clamp(
            max=self.components - 1
        )[:, 0]
        rows = torch.arange(len(k), device=k.device)
        radius = torch.sqrt(-2 * torch.log1p(-u[:, 1].float()))  # Box-Muller, u in [0, 1)
        angle = 2 * math.pi * u[:, 2].float()
        normal = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)
        return mean[rows, k] + (tril[rows, k] @ normal[..., None])[..., 0]


def to_point(n_hits: torch.Tensor, visible_mev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(log(hits + u), log visible MeV): a count made continuous by a uniform ``u`` in [0, 1)."""
    return torch.stack([torch.log(n_hits.float() + u), torch.log(visible_mev.float())], -1)


def from_point(z: torch.Tensor, max_hits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits (B,) long in [1, max_hits + 1] and visible MeV (B,) of points ``z`` (B, 2).

    A count above ``max_hits`` comes back as ``max_hits + 1``: such a shower is cut at
    ``max_hits`` hits and reported as truncated, like a shower that never ends.
    """
    n = torch.floor(torch.exp(z[:, 0].clamp(max=math.log(max_hits + 2)))).long()
    return n.clamp(1, max_hits + 1), torch.exp(z[:, 1].clamp(max=20.0))


def match_visible(energies: np.ndarray, visible_mev: float, threshold_mev: float) -> np.ndarray:
    """Cell energies moved to sum to ``visible_mev`` while every cell stays above the threshold.

    Each cell's energy above the threshold is scaled by one factor, ``t + s (e - t)``: the hottest
    cells, which carry the sum, are scaled by almost the same ratio as a plain rescaling would, but
    a cell just above the threshold stays there. A plain rescaling by 0.6 would push every cell
    below 0.17 MeV under a 0.1 MeV threshold and take those hits out of the shower (and out of the
    hit count the totals model drew). A visible energy at or below ``n t`` cannot be met with ``n``
    cells above ``t``: the cells then all sit just above the threshold.
    """
    e = energies.astype(np.float64)
    above = e - threshold_mev
    spare = float(above.sum())
    if len(e) == 0 or spare <= 0:
        return energies
    scale = max((visible_mev - threshold_mev * len(e)) / spare, 1e-6)
    return (threshold_mev + scale * above).astype(energies.dtype)
