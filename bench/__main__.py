"""Entry point of ``python -m bench``: verification throughput (bench.run),
then revocation propagation and memory (bench.revocation), in one run."""

import sys

from bench import revocation
from bench.run import main

argv = sys.argv[1:]
code = main([a for a in argv if a != "--no-revocation"])
if code == 0 and "--no-revocation" not in argv:
    rows = revocation.run_revocation_bench(quick="--quick" in argv)
    text = "\n".join(["", "Revocation (same run):", "", revocation.markdown(rows)])
    print(text)
    if "--markdown" in argv:
        with open(argv[argv.index("--markdown") + 1], "a") as out:
            out.write(text + "\n")
raise SystemExit(code)
