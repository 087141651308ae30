"""Ferry operator: kopf handlers, planner, webhook and metrics."""
