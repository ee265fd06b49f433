"""CaloFM: a next-hit transformer over two parallel token streams (voxels and energy bins).

Hidden sequence: ``[I, SOS, t1, ..., tn]`` where I is the embedded incident energy, prepended to
both streams. Block 0 is causal cross-attention (queries from the energy stream, keys/values from
the spatial stream, the spatial stream being the residual stream); the other blocks are causal
self-attention. Every block's FFN is a per-class expert. Two heads predict the next voxel and the
next energy bin from the same hidden state. The input side is ``calofm.model.inputs``, the output
side ``calofm.model.scoring``; this module builds the model and runs its blocks.

Options of ``ModelConfig`` beyond the paper's design: the conditions (``Conditions``) added to
every position, not only prepended; the shower's state so far (energy deposited, hits) added to
every position, derived from the tokens in training and generation alike; a factorised voxel head
(``calofm.model.heads``); voxels used once and energies that never rise, both in the loss and in
sampling; one stop decision (the voxel head's) instead of one per head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.attention import RotaryEmbedding
from calofm.model.block import Block
from calofm.model.conditions import Conditions
from calofm.model.config import ModelConfig, parse_class
from calofm.model.experts import Routing
from calofm.model.heads import voxel_head
from calofm.model.inputs import StreamInputs, geometry_table
from calofm.model.kv_cache import KVCache
from calofm.model.linear import Linear
from calofm.model.relative_energy import RelativeBins
from calofm.model.scoring import TokenScoring
from calofm.model.totals import ShowerTotals
from calofm.tokens import Tokenizer, TokenizerConfig


class CaloFM(StreamInputs, TokenScoring, nn.Module):
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
        self.relative = RelativeBins(tokenizer) if config.relative_energy else None
        energy_vocab = tokenizer.energy_vocab if self.relative is None else self.relative.vocab
        self.energy_embed = nn.Embedding(energy_vocab, d)
        self.incident_embed = nn.Linear(1, d)
        self.layer_embed = nn.Embedding(detector.n_layers + 1, d)
        self.x_embed = nn.Embedding(detector.nx + 1, d)
        self.y_embed = nn.Embedding(detector.ny + 1, d)
        self.register_buffer("geometry", geometry_table(detector, tokenizer), persistent=False)
        edges = torch.from_numpy(Tokenizer(tokenizer).edges).float()
        bin_mev = torch.zeros(tokenizer.energy_vocab)
        bin_mev[: tokenizer.n_bins] = (edges[:-1] + edges[1:]) / 2  # the bins' mean decoded energy
        self.register_buffer("bin_mev", bin_mev, persistent=False)
        energy_ids = torch.arange(tokenizer.energy_vocab)
        self.register_buffer("energy_ids", energy_ids, persistent=False)
        # remaining hits/energy too, and the energy per hit still to come
        n_state = (
            2 + 2 * config.totals + config.energy_left_per_hit + 2 * config.transverse_state
        ) * config.shower_state
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
        # Decode-cache state besides the KV cache: the conditions, the energy so far per row and
        # (transverse_state) its first moments in x and y from the beam axis.
        self.cached_conditions: Conditions | None = None
        self.deposited: torch.Tensor | None = None
        self.moments: torch.Tensor | None = None
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
            config.ring_occupancy,
            config.centre_occupancy,
            config.own_occupancy,
            config.layer_energy,
            config.full_rings,
            config.centre_pull_reach if config.centre_pull else None,
        )
        self.energy_head = Linear(d, energy_vocab)
        self.apply(self._init_weights)
        # Initialised after the others: the totals networks keep PyTorch's default initialisation.
        self.totals = ShowerTotals(len(classes), Conditions.N_FEATURES) if config.totals else None

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
        x, xe = self._step_embed(spatial, energy, pos, cond, routing)
        for i, block in enumerate(self.blocks):
            x = block.step(x, rope, routing, pos, mask, queries=xe if i == 0 else None)
        return x[:, 0]

    def forward(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, Vs), (B, T, Ve); position j predicts token j+1 of each stream."""
        routing = self.routing(class_id)
        cond = Conditions.of(cond)
        h = self.hidden_states(spatial, energy, cond, routing)[-1]
        used = self.used_voxels(spatial) if self.config.head_reads_used else None
        layer_mev = self.layer_mev(spatial, energy) if self.config.layer_energy else None
        sums = self.centre_sums(spatial, energy) if self.config.centre_pull else None
        return self.logits(h, routing, energy, used, self.energy_shift(cond), layer_mev, sums)

    def loss(
        self,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
        fed_energy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, spatial NLL, energy NLL) in nats per token on full (B, T+1) sequences.

        With shower totals every position is conditioned on the totals the shower's tokens have;
        the totals model itself is fitted apart (``calofm.training.totals``). The NLLs are those of
        the distributions sampled (``TokenScoring._nll``). ``fed_energy`` (B, T): the energy
        tokens fed at the T positions, where they are not the shower's own (``energy_draws``);
        the targets stay the shower's.
        """
        fed = energy_full[:, :-1] if fed_energy is None else fed_energy
        h, routing, cond = self._teacher_forced(spatial_full, energy_full, fed, cond, class_id)
        nll_s, nll_e = self._nll(
            h, spatial_full, energy_full, routing, self.energy_shift(cond), fed
        )
        return nll_s + nll_e, nll_s, nll_e

    @torch.no_grad()
    def energy_draws(
        self,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, T) an energy bin drawn at every position of full (B, T+1) sequences, each from the
        distribution the position predicts with the shower's own tokens before it (as ``loss``
        sees them): what the model would have fed itself there. Regular bins only, at temperature
        1; a training step feeds some of them back (``TrainConfig.self_drawn_energy``).
        """
        fed = energy_full[:, :-1]
        h, routing, cond = self._teacher_forced(spatial_full, energy_full, fed, cond, class_id)
        h = self.ln_f(h)
        logits = self._energy_logits(h, routing, fed, self.energy_shift(cond)).float()
        logits[..., self.tokenizer.n_bins :] = float("-inf")
        probs = torch.softmax(logits, dim=-1).flatten(0, 1)
        return torch.multinomial(probs, 1, generator=generator).view(fed.shape)

    def _teacher_forced(
        self,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        fed_energy: torch.Tensor,
        cond: Conditions | torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, Routing, Conditions]:
        """The last block's outputs (B, T, d) with the shower's spatial tokens and ``fed_energy``
        fed, the routing, and the conditions (with the shower's own totals, if the model has
        them)."""
        routing = self.routing(class_id)
        cond = self._own_totals(Conditions.of(cond), spatial_full, energy_full)
        h = self.hidden_states(spatial_full[:, :-1], fed_energy, cond, routing)[-1]
        return h, routing, cond

    def _own_totals(
        self, cond: Conditions, spatial_full: torch.Tensor, energy_full: torch.Tensor
    ) -> Conditions:
        """With shower totals, ``cond`` with the totals the shower's tokens have."""
        if self.totals is None:
            return cond
        return cond.with_totals(*self.totals_of(spatial_full[:, 1:], energy_full[:, 1:]))

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
        if c.transverse_state:
            self.moments = torch.zeros(batch_size, 2, device=device or ref.device)
        return self.cache_bytes()

    def cache_bytes(self) -> int:
        return sum(b.attn.kv_cache.nbytes for b in self.blocks if b.attn.kv_cache is not None)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cached_conditions = self.deposited = self.moments = None

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
