"""Ferry's API: pydantic models of the three kinds, the single source of truth for the CRDs."""

GROUP = "ferry.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
