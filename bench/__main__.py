"""Entry point of ``python -m bench``: verification, issuance and the limits
(bench.run), then revocation propagation and memory (bench.revocation,
unless ``--no-revocation``), in one run and one table."""

import sys

from bench.run import main

raise SystemExit(main(sys.argv[1:]))
