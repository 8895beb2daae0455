"""What the engine's Python path and its native fast path share."""

from __future__ import annotations

import logging
import traceback
from typing import Final

from fedtoken.core.model import Reason, Verdict

# Both paths log as the engine.
log = logging.getLogger("fedtoken.verifier.engine")

MALFORMED: Final = Verdict(False, Reason.MALFORMED)
PARSE_ERRORS: Final = (ValueError, TypeError, RecursionError)


def log_unexpected(exc: Exception) -> None:
    # The exception's message may quote the token, so only its type and the
    # stack are logged.
    log.error(
        "unexpected %s while verifying a token; answered MALFORMED\n%s",
        type(exc).__name__,
        "".join(traceback.format_tb(exc.__traceback__)),
    )
