"""CaloFM: a next-hit transformer over two parallel token streams (voxels and energy bins).

Hidden sequence: ``[I, SOS, t1, ..., tn]`` where I is the embedded incident energy, prepended to
both streams. Block 0 is causal cross-attention (queries from the energy stream, keys/values from
the spatial stream, the spatial stream being the residual stream); the other blocks are causal
self-attention. Every block's FFN is a per-class expert. Two heads predict the next voxel and the
next energy bin from the same hidden state.

Each spatial token also carries its voxel's (layer, x, y) through three learned embeddings, so the
model knows a voxel's depth and transverse position even for voxels it has rarely seen; the
special tokens use an extra index of each table.

Options of ``ModelConfig`` beyond the paper's design: the conditions (``Conditions``) added to
every position, not only prepended; the shower's state so far (energy deposited, hits) added to
every position, derived from the tokens in training and generation alike; a factorised voxel head
(``calofm.model.heads``); voxels used once and energies that never rise, both in the loss and in
sampling; one stop decision (the voxel head's) instead of one per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.attention import Attention, RotaryEmbedding
from calofm.model.conditions import LOG_HITS_SCALE, LOG_MEV_SCALE, Conditions
from calofm.model.config import ModelConfig, parse_class
from calofm.model.experts import Experts, RoutedLinear, Routing
from calofm.model.heads import voxel_head
from calofm.model.kv_cache import KVCache
from calofm.model.sampling import sample
from calofm.model.totals import ShowerTotals
from calofm.tokens import Tokenizer, TokenizerConfig


class Block(nn.Module):
    """Pre-LayerNorm block: attention then the row's class expert, each added to the residual."""

    def __init__(self, config: ModelConfig, n_classes: int, cross: bool):
        super().__init__()
        d = config.d_model
        self.cross = cross
        self.ln_attn = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d) if cross else None  # the spatial stream's own norm
        self.attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(d)
        self.experts = Experts(d, config.ffn_dim, n_classes)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        queries: torch.Tensor | None = None,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        if self.cross:
            x = x + self.attn(self.ln_attn(queries), self.ln_kv(x), rope, routing, cache_pos)
        else:
            h = self.ln_attn(x)
            x = x + self.attn(h, h, rope, routing, cache_pos)
        return x + self.experts(self.ln_ffn(x), routing)

    def step(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        pos: torch.Tensor,
        mask: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` for one new position per row at per-row positions (``Attention.step``)."""
        if self.cross:
            x = x + self.attn.step(self.ln_attn(queries), self.ln_kv(x), rope, routing, pos, mask)
        else:
            h = self.ln_attn(x)
            x = x + self.attn.step(h, h, rope, routing, pos, mask)
        return x + self.experts(self.ln_ffn(x), routing)


class CaloFM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: TokenizerConfig,
        detector: DetectorConfig,
        classes: list[str],
    ):
        super().__init__()
        if tokenizer.n_voxels != detector.n_voxels:
            raise CalofmError(
                f"model: tokenizer has {tokenizer.n_voxels} voxels, detector {detector.n_voxels}"
            )
        if not classes or len(set(classes)) != len(classes):
            raise CalofmError(f"model: need at least one class and no duplicates, got {classes}")
        for name in classes:
            parse_class(name)
        self.config, self.tokenizer, self.detector = config, tokenizer, detector
        self.classes = list(classes)
        d = config.d_model

        self.spatial_embed = nn.Embedding(tokenizer.spatial_vocab, d)
        self.energy_embed = nn.Embedding(tokenizer.energy_vocab, d)
        self.incident_embed = nn.Linear(1, d)
        self.layer_embed = nn.Embedding(detector.n_layers + 1, d)
        self.x_embed = nn.Embedding(detector.nx + 1, d)
        self.y_embed = nn.Embedding(detector.ny + 1, d)
        self.register_buffer("geometry", self._geometry_table(), persistent=False)
        edges = torch.from_numpy(Tokenizer(tokenizer).edges).float()
        bin_mev = torch.zeros(tokenizer.energy_vocab)
        bin_mev[: tokenizer.n_bins] = (edges[:-1] + edges[1:]) / 2  # the bins' mean decoded energy
        self.register_buffer("bin_mev", bin_mev, persistent=False)
        energy_ids = torch.arange(tokenizer.energy_vocab)
        self.register_buffer("energy_ids", energy_ids, persistent=False)
        n_state = (2 + 2 * config.totals) * config.shower_state  # remaining hits/energy too
        n_context = (
            Conditions.N_FEATURES * config.condition_every_position
            + Conditions.N_TOTALS * config.totals
            + n_state
        )
        self.context = (
            nn.Sequential(nn.Linear(n_context, d), nn.GELU(), nn.Linear(d, d))
            if n_context
            else None
        )
        # Decode-cache state besides the KV cache: the conditions and the energy so far per row.
        self.cached_conditions: Conditions | None = None
        self.deposited: torch.Tensor | None = None
        # The one seam for adapters of the embedded streams (calofm.adapters.AdaptedModel sets it).
        self.embed_adapters: nn.Module | None = None
        self.rope = RotaryEmbedding(config)
        self.blocks = nn.ModuleList(
            Block(config, len(classes), cross=(i == 0)) for i in range(config.n_blocks)
        )
        self.ln_f = nn.LayerNorm(d)
        self.spatial_head = voxel_head(
            config.voxel_head,
            d,
            tokenizer,
            detector,
            self.geometry[:, 0].clone(),
            config.voxel_occupancy,
        )
        self.energy_head = RoutedLinear(d, tokenizer.energy_vocab)
        self.apply(self._init_weights)
        # Initialised after the others: the totals networks keep PyTorch's default initialisation.
        self.totals = ShowerTotals(len(classes), Conditions.N_FEATURES) if config.totals else None

    def _geometry_table(self) -> torch.Tensor:
        """(spatial_vocab, 3) of (layer, x, y) per spatial id; special ids get (L, nx, ny)."""
        det, tok = self.detector, self.tokenizer
        layer, x, y = det.voxel_to_lxy(torch.arange(det.n_voxels).numpy())
        table = torch.tensor([det.n_layers, det.nx, det.ny]).repeat(tok.spatial_vocab, 1)
        table[: det.n_voxels] = torch.stack(
            [torch.from_numpy(layer), torch.from_numpy(x), torch.from_numpy(y)], dim=1
        )
        return table

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        # Residual projections scaled down with depth (GPT-2).
        for name in ("wo", "fc2"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=std / math.sqrt(2 * self.config.n_blocks))

    # ---- classes -------------------------------------------------------------------------------

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise CalofmError(
                f"model has no class {name!r}; its classes: {', '.join(self.classes)}"
            )
        return self.classes.index(name)

    def add_class(self, name: str, init_from: str | None = None) -> list[nn.Parameter]:
        """Add one expert per block for a new class; returns the new parameters.

        The experts are copies of ``init_from``'s (a known class) or freshly initialised.
        """
        parse_class(name)
        if name in self.classes:
            raise CalofmError(f"model already has class {name!r}")
        src = None if init_from is None else self.class_index(init_from)
        params: list[nn.Parameter] = []
        for block in self.blocks:
            expert = block.experts.add(src)
            if src is None:
                expert.apply(self._init_weights)
            params.extend(expert.parameters())
        if self.totals is not None:
            params.extend(self.totals.add(src).parameters())
        self.classes.append(name)
        return params

    def routing(self, class_id: torch.Tensor) -> Routing:
        return Routing(class_id, self.classes)

    # ---- forward -------------------------------------------------------------------------------

    def _context(
        self, cond: Conditions, energy: torch.Tensor, start: int | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """(B, t, d) added to every position: the conditions and/or the shower's state so far.

        The state at token k (SOS is token 0) is that of hits 1..k: their count and the energy
        their bins decode to on average, summed from the tokens. On cached passes (``start`` not
        None) ``self.deposited`` carries the sum from one decode step to the next.
        """
        if self.context is None:
            return None
        b, t = energy.shape
        parts = []
        if self.config.condition_every_position:
            parts.append(cond.features(dtype)[:, None, :].expand(b, t, -1))
        if self.config.totals:
            if not cond.has_totals:
                raise CalofmError("model: a model with shower totals needs them in the conditions")
            parts.append(cond.totals_features(dtype)[:, None, :].expand(b, t, -1))
        if self.config.shower_state:
            deposited = self.bin_mev[energy].cumsum(dim=1)
            if start is not None:
                if self.deposited is None:
                    raise CalofmError("model: call setup_cache before decoding with a cache")
                if start > 0:
                    deposited = deposited + self.deposited[:, None]
                self.deposited.copy_(deposited[:, -1])
            first = start or 0
            hits = torch.arange(first, first + t, device=energy.device, dtype=dtype).expand(b, t)
            deposited = deposited.to(dtype)
            state = [torch.log1p(deposited) / LOG_MEV_SCALE, torch.log1p(hits) / LOG_HITS_SCALE]
            if self.config.totals:  # what is left to deposit, as fractions of the totals
                state.append(1 - deposited / cond.visible.to(dtype)[:, None].clamp(min=1e-3))
                state.append(1 - hits / cond.n_hits.to(dtype)[:, None].clamp(min=1))
            parts.append(torch.stack(state, dim=-1))
        return self.context(torch.cat(parts, dim=-1))

    def _embed(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        cond: Conditions,
        routing: Routing,
        start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded streams, the conditions token prepended on a sequence's first pass."""
        g = self.geometry[spatial]
        xs = (
            self.spatial_embed(spatial)
            + self.layer_embed(g[..., 0])
            + self.x_embed(g[..., 1])
            + self.y_embed(g[..., 2])
        )
        xe = self.energy_embed(energy)
        context = self._context(cond, energy, start, xs.dtype)
        if context is not None:
            xs, xe = xs + context, xe + context
        xi = None
        if not start:
            xi = self.incident_embed(cond.incident.to(xs.dtype)[:, None])[:, None, :]
        if self.embed_adapters is not None:
            xs, xe, xi = self.embed_adapters(xs, xe, xi, spatial, routing)
        if xi is not None:
            xs, xe = torch.cat([xi, xs], dim=1), torch.cat([xi, xe], dim=1)
        return xs, xe

    def hidden_states(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        cond: Conditions | torch.Tensor | None,
        routing: Routing,
        start: int | None = None,
    ) -> list[torch.Tensor]:
        """Every block's output (B, t, d) at the positions of the t given tokens.

        ``start=None``: a full causal pass over tokens 0..t-1 (SOS first), conditions prepended.
        ``start=j``: tokens j..j+t-1 against the KV cache (which holds tokens before j); for
        ``j == 0`` the conditions are prepended and kept for the later steps, which need none.
        ``cond`` is a ``Conditions`` or a bare (B,) tensor of scaled incident energies.
        """
        first = start is None or start == 0
        if first and cond is None:
            raise CalofmError("model: the first step needs the conditions (incident energies)")
        if start is not None:
            if first:
                self.cached_conditions = Conditions.of(cond)
            elif self.cached_conditions is None:
                raise CalofmError("model: a cached pass must start at token 0 (the conditions)")
            cond = self.cached_conditions
        cond = Conditions.of(cond)
        xs, xe = self._embed(spatial, energy, cond, routing, start)
        pos0 = 0 if first else start + 1  # hidden position of the first input
        rope = self.rope(torch.arange(pos0, pos0 + xs.shape[1], device=xs.device))
        cache_pos = None if start is None else pos0
        out = []
        x = xs
        for i, block in enumerate(self.blocks):
            x = block(x, rope, routing, queries=xe if i == 0 else None, cache_pos=cache_pos)
            out.append(x[:, 1:] if first else x)
        return out

    def _step_context(
        self, cond: Conditions, energy: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``_context`` for one token per row (B,) at per-row positions ``pos`` (B,): the same
        features, from tensors only (the decode step is captured or compiled once).

        The token at hidden position p >= 1 is token p - 1 of its stream, so the shower has p - 1
        hits before it; ``self.deposited`` restarts at a row's first token (p <= 1).
        """
        if self.context is None:
            return None
        parts = []
        if self.config.condition_every_position:
            parts.append(cond.features(dtype))
        if self.config.totals:
            parts.append(cond.totals_features(dtype))
        if self.config.shower_state:
            assert self.deposited is not None, "call setup_cache before decoding with a cache"
            fresh = pos <= 1
            deposited = torch.where(fresh, 0.0, self.deposited) + self.bin_mev[energy]
            self.deposited.copy_(deposited)
            deposited = deposited.to(dtype)
            hits = (pos - 1).clamp(min=0).to(dtype)
            state = [torch.log1p(deposited) / LOG_MEV_SCALE, torch.log1p(hits) / LOG_HITS_SCALE]
            if self.config.totals:
                state.append(1 - deposited / cond.visible.to(dtype).clamp(min=1e-3))
                state.append(1 - hits / cond.n_hits.to(dtype).clamp(min=1))
            parts.append(torch.stack(state, dim=-1))
        return self.context(torch.cat(parts, dim=-1))[:, None, :]

    def decode_step(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        pos: torch.Tensor,
        cond: Conditions,
        routing: Routing,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """The last block's output (B, d) for one input per row, row i at hidden position
        ``pos[i]``: the conditions token where ``pos`` is 0, else the tokens ``spatial``,
        ``energy`` (B,). Static shapes and no host synchronisation, so rows can be at different
        positions (continuous batching) and the step can be captured (CUDA graphs) or compiled.
        ``rope`` and ``mask`` as for ``Attention.step``. Equals ``hidden_states`` with the KV
        cache, up to float round-off (tests/test_static_decode.py).
        """
        s, e = spatial[:, None], energy[:, None]
        g = self.geometry[s]
        xs = (
            self.spatial_embed(s)
            + self.layer_embed(g[..., 0])
            + self.x_embed(g[..., 1])
            + self.y_embed(g[..., 2])
        )
        xe = self.energy_embed(e)
        context = self._step_context(cond, energy, pos, xs.dtype)
        if context is not None:
            xs, xe = xs + context, xe + context
        xi = self.incident_embed(cond.incident.to(xs.dtype)[:, None])[:, None, :]
        if self.embed_adapters is not None:
            xs, xe, xi = self.embed_adapters(xs, xe, xi, s, routing)
        first = (pos == 0)[:, None, None]
        x, xe = torch.where(first, xi, xs), torch.where(first, xi, xe)
        for i, block in enumerate(self.blocks):
            x = block.step(x, rope, routing, pos, mask, queries=xe if i == 0 else None)
        return x[:, 0]

    def _energy_logits(
        self, h: torch.Tensor, routing: Routing, previous: torch.Tensor | None
    ) -> torch.Tensor:
        """Energy logits after the final norm; with ``falling_energy`` no bin above ``previous``,
        with ``single_stop`` never end-of-sequence.

        ``previous`` holds the energy tokens the positions were fed (SOS, PAD: no constraint).
        """
        logits = self.energy_head(h, routing)
        ids = self.energy_ids
        if self.config.single_stop:  # the energy of a shower that goes on: EOS is not among them
            logits = logits.masked_fill(ids == self.tokenizer.energy_eos, float("-inf"))
        if self.config.falling_energy and previous is not None:
            above = (ids > previous[..., None]) & (ids < self.tokenizer.n_bins)
            logits = logits.masked_fill(above, float("-inf"))
        return logits

    def totals_of(
        self, spatial: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit count (B,) and visible MeV (B,) of token sequences: hits are the regular spatial
        tokens, the visible energy is the sum of their bins' mean energies (as the state's)."""
        n_hits = (spatial < self.tokenizer.n_voxels).sum(1)
        visible = self.bin_mev[energy].sum(1).clamp(min=self.tokenizer.threshold_mev)
        return n_hits, visible

    def logits(
        self,
        h: torch.Tensor,
        routing: Routing,
        previous_energy: torch.Tensor | None = None,
        used: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial logits (B, t, Vs) (log-probabilities for a factorised head) and energy logits
        (B, t, Ve) from block outputs ``h``; ``previous_energy`` (B, t) the fed energy tokens;
        ``used`` (B, t, voxels) the voxels each position's shower has (a head that reads them)."""
        h = self.ln_f(h)
        if used is None:
            spatial = self.spatial_head.scores(h, routing=routing)
        else:
            spatial = self.spatial_head.scores(h, routing=routing, used=used)
        return spatial, self._energy_logits(h, routing, previous_energy)

    def used_voxels(self, spatial: torch.Tensor) -> torch.Tensor:
        """(B, t, voxels) bool: the voxels among tokens 0..j of ``spatial`` (B, t), per j."""
        n = self.tokenizer.n_voxels
        hits = F.one_hot(spatial.clamp(max=n), n + 1)[..., :n]
        return hits.cumsum(dim=1) > 0

    def forward(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, Vs), (B, T, Ve); position j predicts token j+1 of each stream."""
        routing = self.routing(class_id)
        h = self.hidden_states(spatial, energy, cond, routing)[-1]
        used = self.used_voxels(spatial) if self.config.head_reads_used else None
        return self.logits(h, routing, energy, used)

    def loss(
        self,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, spatial NLL, energy NLL) in nats per token on full (B, T+1) sequences.

        With shower totals every position is conditioned on the totals the shower's tokens have;
        the totals model itself is fitted apart (``calofm.training.totals``).

        PAD targets are ignored; with ``single_stop`` the energy stream's EOS targets count zero
        nats (the voxel head predicts the end), so both NLLs stay means over the same target
        tokens and batch means combine exactly (validation, DDP). With ``exclude_used_voxels``
        each position's voxel distribution is renormalised over the voxels the shower does not
        have yet; with ``falling_energy`` the energy distribution over the bins not above the
        previous one: the distributions sampled.
        """
        tok = self.tokenizer
        routing = self.routing(class_id)
        inputs_s, inputs_e = spatial_full[:, :-1], energy_full[:, :-1]
        targets_s, targets_e = spatial_full[:, 1:], energy_full[:, 1:]
        cond = Conditions.of(cond)
        if self.totals is not None:  # conditioned on the totals the shower's tokens have
            cond = cond.with_totals(*self.totals_of(targets_s, targets_e))
        h = self.ln_f(self.hidden_states(inputs_s, inputs_e, cond, routing)[-1])
        history = inputs_s if self.config.exclude_used_voxels else None
        log_p = self.spatial_head.log_prob(h, targets_s, history, routing=routing)
        real = targets_s != tok.spatial_pad
        nll_s = -torch.where(real, log_p, torch.zeros_like(log_p)).sum() / real.sum().clamp(min=1)
        le = self._energy_logits(h, routing, inputs_e)
        n_targets = (targets_e != tok.energy_pad).sum().clamp(min=1)
        if self.config.single_stop:  # the end is the voxel head's to predict
            targets_e = targets_e.masked_fill(targets_e == tok.energy_eos, tok.energy_pad)
        nll_e = (
            F.cross_entropy(
                le.flatten(0, 1).float(),
                targets_e.flatten(),
                ignore_index=tok.energy_pad,
                reduction="sum",
            )
            / n_targets
        )
        return nll_s + nll_e, nll_s, nll_e

    @torch.no_grad()
    def next_tokens(
        self,
        h: torch.Tensor,
        routing: Routing,
        u: torch.Tensor | None,
        used: torch.Tensor | None,
        previous_energy: torch.Tensor,
        temperature: float | torch.Tensor,
        top_k: int | None = None,
        top_p: float | None = None,
        can_end: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next (voxel, energy bin) per row from the last block's output ``h`` (B, d).

        ``u`` (B, 4): the row's uniforms for this step (layer, x, y, energy; a flat head uses the
        first for the voxel); ``used`` (B, n_voxels) the voxels never to draw again (or None);
        ``previous_energy`` (B,) the last energy token fed; ``can_end`` (B,) bool: rows whose
        voxel head may end the shower here (None: all). SOS and PAD never come out.
        """
        tok = self.tokenizer
        h = self.ln_f(h)
        s = self.spatial_head.sample(
            h,
            None if u is None else u[:, :3],
            used,
            temperature,
            top_k,
            top_p,
            routing=routing,
            can_end=can_end,
        )
        le = self._energy_logits(h, routing, previous_energy).float()
        le[:, tok.energy_sos] = le[:, tok.energy_pad] = float("-inf")  # no index tensors
        e = sample(le, None if u is None else u[:, 3], temperature, top_k, top_p)
        return s, e

    # ---- KV-cache decoding ---------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_tokens: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> int:
        """Allocate a cache for ``max_tokens`` stream tokens (SOS included) plus the incident slot.

        Block 0's cache holds the spatial stream's keys/values, the others their own stream's.
        Returns the cache size in bytes.
        """
        ref = self.energy_head.weight
        c = self.config
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch_size,
                c.n_heads,
                max_tokens + 1,
                c.head_dim,
                dtype=dtype or ref.dtype,
                device=device or ref.device,
            )
        self.deposited = torch.zeros(batch_size, device=device or ref.device)
        return self.cache_bytes()

    def cache_bytes(self) -> int:
        return sum(b.attn.kv_cache.nbytes for b in self.blocks if b.attn.kv_cache is not None)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cached_conditions = self.deposited = None

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
