"""`kubectl ferry`: status at a glance, live RefitJob progress, and refit in one command.

Pure rendering lives in `units`, `tables`, `progress` and `selector`; `kube` is the
thin adapter over the Kubernetes API (the user's own credentials, any kubeconfig);
`cli` wires them together.
"""
