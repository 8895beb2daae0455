"""The committed stubs must equal what scripts/gen_protos.py generates now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python" / "fedtoken_client" / "_pb"


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "_pb"
    _load_generator().generate(out)
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    committed = {p.relative_to(COMMITTED): p.read_bytes() for p in COMMITTED.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(committed), "stubs added or removed: run scripts/gen_protos.py"
    drifted = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run scripts/gen_protos.py"
