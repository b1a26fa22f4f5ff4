"""The seven stress scenarios of the requirements, as runnable checks with figures and verdicts.

Each scenario (``qtrader_tools.stress.scenarios``) starts the real parts it needs (nats-server,
redis-server, the local Binance-compatible server, worker processes), drives them, measures, and
returns a ``ScenarioResult``: its figures and one ``Criterion`` per numeric pass rule. The same
functions back the pytest ``stress`` tests and ``qtrader stress``, which writes a Markdown and a
JSON report.
"""
