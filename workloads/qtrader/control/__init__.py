"""The control plane's pure decisions: the EmergencyStop (kill switch) state machine."""
