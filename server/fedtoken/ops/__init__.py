"""Operability: Prometheus metrics (``fedtoken.ops.metrics``)."""
