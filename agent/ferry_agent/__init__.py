"""Ferry agent: the per-pod sidecar that owns weight memory and moves bytes over NIXL."""
