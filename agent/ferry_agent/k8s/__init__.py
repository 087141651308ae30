"""The agent's side of the control plane: its Lease, its own status entries, its assignments."""
