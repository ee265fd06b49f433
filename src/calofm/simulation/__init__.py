"""The embedded Geant4 simulator: reference showers for training and validation, made offline.

``tables`` writes calofm's own analytic stand-in data tables (bremsstrahlung below 1 GeV and the
photoelectric effect; Geant4's data sets cannot be downloaded here), ``geant4`` is one process's
Geant4 set-up (geometry from a ``DetectorConfig``, ``G4EmStandardPhysics_option1``, 0.7 mm cut),
and ``runner`` spreads seeded chunks over worker processes into a resumable shower file.
Importing this package does not import Geant4; only the worker processes (and the material check)
do.
"""

from calofm.simulation.runner import SimulationRequest, simulate, simulate_to_file

__all__ = ["SimulationRequest", "simulate", "simulate_to_file"]
