"""Helpers the tests share: real servers and real workload processes on loopback ports."""
