"""The live event stream for viewers: a fan-out hub and its FastAPI WebSocket endpoint."""

from __future__ import annotations

from qtrader.viewer.app import attach_viewer, create_viewer_app
from qtrader.viewer.fanout import Batch, ClientFeed, ClientStats, FanoutHub, TooManyClients

__all__ = [
    "Batch",
    "ClientFeed",
    "ClientStats",
    "FanoutHub",
    "TooManyClients",
    "attach_viewer",
    "create_viewer_app",
]
