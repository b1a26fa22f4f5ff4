"""The health contract served by every workload."""
