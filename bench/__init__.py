"""fedtoken benchmarks: ``python -m bench`` (or ``scripts/dev bench``).

Every figure is printed next to a baseline measured in the same run and the
ratio between them; absolute numbers on shared machines drift too much to be
compared across runs (see docs/benchmarks.md).
"""
