"""The sample messages live with the poison catalogue (``qtrader.stress.poison``)."""

from qtrader.stress.poison import sample_messages

__all__ = ["sample_messages"]
