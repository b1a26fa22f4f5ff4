"""The sample messages live with the poison catalogue (``qtrader_tools.stress.poison``)."""

from qtrader_tools.stress.poison import sample_messages

__all__ = ["sample_messages"]
