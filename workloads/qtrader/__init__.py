"""Quantum Trader's data plane: contracts, bus, health contract and the four workload roles."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quantum-trader")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
