"""Attach, detach, enable and disable adapters; the base weights stay frozen and are checked.

A model with adapters is the base model plus an ordered set of adapters, recorded in an
``AdapterRegistry`` kept on the model. On first use the registry notes the base weights (their
names and content hash) and freezes them. The rules that keep every base class (and every other
adapter) untouched:

- a particle adapter is refused for a particle the base model already has (its LoRA and heads would
  act on base rows) or that another adapter already adapts;
- an expert adapter's class must be new and of a particle the base model or an attached particle
  adapter knows;
- every module of an adapter acts only on its own rows (its particle's or its class's);
- ``check_base`` recomputes the base hash; the stages call it after training.

An adapter's ``stacked_on`` lists the adapters that act on its rows and were present when it was
trained (the particle adapter under a new material's expert); they must be loaded with it and
cannot be detached before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from calofm.adapters.config import AdapterConfig
from calofm.adapters.embeddings import add_bottlenecks, remove_embedding_adapters
from calofm.adapters.expert import add_conditioning, add_expert, remove_conditioning, remove_expert
from calofm.adapters.heads import add_particle_heads, remove_particle_heads
from calofm.adapters.lora import add_lora, remove_lora
from calofm.errors import CalofmError
from calofm.model.config import parse_class
from calofm.model.io import weights_hash
from calofm.model.transformer import CaloFM

PARTS = ("lora", "heads", "bottleneck", "expert", "condition")


@dataclass
class AttachedAdapter:
    config: AdapterConfig
    parts: dict[str, dict[str, nn.Module]]  # part -> {tensor-name prefix -> module}
    stacked_on: list[str]  # names of the adapters it was trained on top of
    sha256: str | None = None  # content hash of its tensors, once saved or loaded
    source: str | None = None  # the directory it was loaded from or saved to
    manifest: dict | None = None

    def modules(self) -> Iterator[nn.Module]:
        for part in self.parts.values():
            yield from part.values()

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under names that do not depend on the model's other contents."""
        return {
            f"{prefix}.{name}": t
            for part in self.parts.values()
            for prefix, module in part.items()
            for name, t in module.state_dict().items()
        }

    def counts(self) -> dict[str, int]:
        """Parameters per part and in total."""
        out = {
            part: sum(p.numel() for m in modules.values() for p in m.parameters())
            for part, modules in self.parts.items()
        }
        out["total"] = sum(out.values())
        return out


@dataclass
class AdapterRegistry:
    base_hash: str
    base_keys: frozenset[str]
    base_classes: tuple[str, ...]
    adapters: dict[str, AttachedAdapter] = field(default_factory=dict)

    @property
    def base_particles(self) -> set[str]:
        return {parse_class(c)[1] for c in self.base_classes}

    def particle_adapter(self, particle: str) -> AttachedAdapter | None:
        for a in self.adapters.values():
            if a.config.particle == particle:
                return a
        return None


def registry(model: CaloFM) -> AdapterRegistry:
    """The model's adapter registry; created (base noted and frozen) on first use."""
    reg = getattr(model, "adapter_registry", None)
    if reg is None:
        state = model.state_dict()
        reg = AdapterRegistry(weights_hash(state), frozenset(state), tuple(model.classes))
        for p in model.parameters():
            p.requires_grad_(False)
        model.adapter_registry = reg
    return reg


def base_weights_hash(model: CaloFM) -> str:
    """The content hash of the base weights alone (equal to the base manifest's)."""
    reg = registry(model)
    state = model.state_dict()
    return weights_hash({k: state[k] for k in reg.base_keys})


def check_base(model: CaloFM) -> None:
    """Raise if the base weights differ from those the registry noted."""
    if base_weights_hash(model) != registry(model).base_hash:
        raise CalofmError("the base model's weights have changed; adapters must leave them alone")


def attach(
    model: CaloFM,
    config: AdapterConfig,
    *,
    generator: torch.Generator | None = None,
    initialise: bool = True,
) -> AttachedAdapter:
    """Add a new adapter's modules (trainable, the rest untouched) and register it.

    ``initialise=False`` skips the expert's initial copy or random draw (for loading, where the
    saved tensors replace them anyway).
    """
    reg = registry(model)
    name, particle = config.name, config.class_particle
    if name in reg.adapters:
        raise CalofmError(f"an adapter named {name} is already attached")
    if config.particle is not None:
        if particle in reg.base_particles:
            raise CalofmError(
                f"particle {particle} is one of the base model's; a particle adapter would "
                "change its classes (add a new material with an expert adapter instead)"
            )
        if reg.particle_adapter(particle) is not None:
            raise CalofmError(f"particle {particle} already has an adapter attached")
    elif particle not in reg.base_particles and reg.particle_adapter(particle) is None:
        raise CalofmError(
            f"class {config.class_name}: particle {particle} is unknown to the base model; load "
            "its particle adapter first (--adapter) or train one (calofm adapt-particle)"
        )
    if config.class_name is not None and config.class_name in model.classes:
        raise CalofmError(f"model already has class {config.class_name}")
    if config.init_from is not None and initialise:
        model.class_index(config.init_from)

    stacked_on = []
    if config.particle is None and reg.particle_adapter(particle) is not None:
        under = reg.particle_adapter(particle)
        stacked_on.append(under.config.name)
    parts: dict[str, dict[str, nn.Module]] = {}
    try:
        if config.particle is not None:
            parts["lora"] = add_lora(model, particle, config.rank, config.alpha, generator)
            parts["heads"] = add_particle_heads(model, particle)
            if config.embed_bottleneck:
                b = add_bottlenecks(model, particle, config.embed_bottleneck, generator)
                parts["bottleneck"] = {"embed.bottleneck": b}
        if config.class_name is not None:
            init = config.init_from if initialise else model.classes[0]
            parts["expert"] = add_expert(model, config.class_name, init)
            if config.condition:
                parts["condition"] = add_conditioning(model, config.class_name)
    except Exception:
        _remove(model, config)
        raise
    adapter = AttachedAdapter(config, parts, stacked_on)
    for p in adapter.parameters():
        p.requires_grad_(True)
    reg.adapters[name] = adapter
    return adapter


def _remove(model: CaloFM, config: AdapterConfig) -> None:
    """Remove whatever modules ``config``'s adapter has (attach checked that none pre-existed)."""
    if config.particle is not None:
        remove_lora(model, config.particle)
        remove_particle_heads(model, config.particle)
        remove_embedding_adapters(model, config.particle, None)
    if config.class_name is not None:
        remove_conditioning(model, config.class_name)
        if config.class_name in model.classes:
            remove_expert(model, config.class_name)


def detach(model: CaloFM, name: str) -> None:
    """Remove an adapter and its modules (and its class, for an expert adapter)."""
    reg = registry(model)
    adapter = _get(reg, name)
    users = [a.config.name for a in reg.adapters.values() if name in a.stacked_on]
    if users:
        raise CalofmError(f"adapter {name} is under {', '.join(users)}; detach those first")
    _remove(model, adapter.config)
    del reg.adapters[name]


def detach_all(model: CaloFM) -> None:
    """Remove every adapter, the most recent first."""
    for name in reversed(list(registry(model).adapters)):
        detach(model, name)


def set_enabled(model: CaloFM, enabled: bool, names: list[str] | None = None) -> None:
    """Switch adapters on or off (all when ``names`` is None).

    A switched-off adapter's LoRA, heads, bottlenecks and conditioning stop acting. Its expert, if
    any, stays: it is its class's only expert and acts on no other class's rows.
    """
    reg = registry(model)
    for name in reg.adapters if names is None else names:
        for module in _get(reg, name).modules():
            if hasattr(module, "enabled"):
                module.enabled = enabled


def enable(model: CaloFM, names: list[str] | None = None) -> None:
    set_enabled(model, True, names)


def disable(model: CaloFM, names: list[str] | None = None) -> None:
    set_enabled(model, False, names)


@contextmanager
def disabled(model: CaloFM, names: list[str] | None = None) -> Iterator[CaloFM]:
    """Adapters switched off inside the block; their previous states restored afterwards."""
    reg = registry(model)
    modules = [
        m
        for name in (reg.adapters if names is None else names)
        for m in _get(reg, name).modules()
        if hasattr(m, "enabled")
    ]
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, states, strict=True):
            m.enabled = state


def describe(model: CaloFM) -> dict:
    """What a model is made of, for provenance: the base weights' hash and each adapter's."""
    reg = registry(model)
    return {
        "base_weights_sha256": reg.base_hash,
        "adapters": [
            {"name": a.config.name, "kind": a.config.kind, "sha256": a.sha256, "dir": a.source}
            for a in reg.adapters.values()
        ],
    }


def _get(reg: AdapterRegistry, name: str) -> AttachedAdapter:
    if name not in reg.adapters:
        attached = ", ".join(reg.adapters) or "none"
        raise CalofmError(f"no adapter named {name} is attached (attached: {attached})")
    return reg.adapters[name]
