"""Wire contracts shared by the workloads and the operator: names, messages, policy."""
