"""Quantum Trader's control plane: the kopf operator for TradingPolicy and EmergencyStop."""
