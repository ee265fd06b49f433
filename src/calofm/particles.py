"""Particle names (Geant4 spelling) and their PDG codes, as stored in showerdata files."""

from __future__ import annotations

from calofm.errors import CalofmError

PDG_CODES = {
    "gamma": 22,
    "e-": 11,
    "e+": -11,
    "mu-": 13,
    "mu+": -13,
    "pi-": -211,
    "pi+": 211,
    "pi0": 111,
    "proton": 2212,
    "neutron": 2112,
    "kaon+": 321,
    "kaon-": -321,
    "kaon0L": 130,
}


def pdg_code(particle: str) -> int:
    if particle not in PDG_CODES:
        raise CalofmError(f"unknown particle {particle!r}; known: {', '.join(PDG_CODES)}")
    return PDG_CODES[particle]


def particle_from_pdg(code: int) -> str:
    for name, pdg in PDG_CODES.items():
        if pdg == code:
            return name
    raise CalofmError(f"unknown PDG code {code}")
