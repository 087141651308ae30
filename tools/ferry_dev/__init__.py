"""Local development cluster: control plane, operator and agents as local processes."""
