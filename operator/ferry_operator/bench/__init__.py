"""Control-plane benchmarks (`ferry bench control-plane`)."""
