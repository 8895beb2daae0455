"""Log configuration: human text on a terminal, one JSON object per line
otherwise (or as ``log_format`` says).

API: ``configure(log_format: str = "auto", level: int = logging.INFO,
worker: str = "")`` installs the root handler (serve, each worker, the CLI).
Request-scoped fields (request id, method, principal, tenant, outcome,
duration_ms) are passed as ``extra={...}`` by the RPC boundary's access log.
Never log a token, a PIN or key material.
"""

from __future__ import annotations

import logging

__all__ = ["configure"]


def configure(log_format: str = "auto", level: int = logging.INFO,
              worker: str = "") -> None:  # pragma: no cover - filled in by the logging work
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
