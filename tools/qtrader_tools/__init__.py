"""Quantum Trader's tooling: the simulator, the stress scenarios, the benchmarks and the process
helpers of the tests. It imports the runtime (``qtrader``); the runtime never imports it."""
