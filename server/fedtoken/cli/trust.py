"""``fedtoken trust ...``: the foreign issuers our tenants trust (federation),
administered through KeyAdmin like every other command.

    fedtoken trust add ISSUER [--tenant T ...] [--jwks-uri URI]
                       [--alg ALG ...] [--audience A ...] [--namespace NS]
                       [--max-stale DURATION]
    fedtoken trust list [--tenant T]
    fedtoken trust remove ISSUER
    fedtoken trust refresh ISSUER

``add`` needs at least one ``--tenant`` (a foreign token verifies only in a
tenant that trusts its issuer; there is no default), and replaces the whole
definition of an issuer already trusted (give every tenant again).
``refresh`` exits 1 when the issuer's key set is not usable afterwards (its
tokens are refused), so scripts notice.

``cli.main`` registers these with its own helpers (client, output,
durations), passed in rather than imported back.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from fedtoken_client import FedtokenClient

Connect = Callable[[argparse.Namespace], FedtokenClient]
Emit = Callable[[Any], None]


def _as_dict(msg: Message) -> dict[str, Any]:
    # Every field, defaults included: "usable": false must show.
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def run(ns: argparse.Namespace, *, connect: Connect, emit: Emit) -> int:
    with connect(ns) as c:
        if ns.action == "add":
            emit(_as_dict(c.add_trusted_issuer(
                ns.issuer, tenants=ns.tenant or (), jwks_uri=ns.jwks_uri,
                algorithms=ns.alg or (), audiences=ns.audience or (),
                namespace=ns.namespace, max_stale_seconds=ns.max_stale)))
        elif ns.action == "list":
            emit([_as_dict(i) for i in c.list_trusted_issuers(ns.tenant)])
        elif ns.action == "remove":
            emit(_as_dict(c.remove_trusted_issuer(ns.issuer)))
        else:
            refreshed = c.refresh_trusted_issuer(ns.issuer)
            emit(_as_dict(refreshed))
            return 0 if refreshed.key_set.usable else 1
    return 0


def add_trust_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
                       connect: Connect, emit: Emit, duration: Callable[[str], int]) -> None:
    tr = sub.add_parser("trust", help="trust foreign issuers (federation): add, list, "
                                      "remove, refresh")
    tsub = tr.add_subparsers(dest="action", required=True)
    add = tsub.add_parser("add", help="trust an issuer for tenants, or replace its definition")
    add.add_argument("issuer", help="the issuer URL, exactly as its tokens' iss (https)")
    # Not required here: the server refuses none with the reason (one rule).
    add.add_argument("--tenant", action="append",
                     help="a local tenant that trusts it (repeatable; at least one)")
    add.add_argument("--jwks-uri", default="",
                     help="its JWKS URL (default: OIDC discovery under the issuer)")
    add.add_argument("--alg", action="append",
                     help="an algorithm accepted from it, RS256 or PS256 (repeatable; "
                          "default RS256)")
    add.add_argument("--audience", action="append",
                     help="an audience its tokens may address (repeatable; default any)")
    add.add_argument("--namespace", default="",
                     help="prefix of its subjects in token exchange, ending in ':' "
                          "(default: from the issuer URL, e.g. b.example:)")
    add.add_argument("--max-stale", type=duration, default=0,
                     help="how long its last good key set serves while it is unreachable, "
                          "e.g. 12h, 30d (60s to 30d; default 1d)")
    lst = tsub.add_parser("list", help="trusted issuers and the state of their key sets")
    lst.add_argument("--tenant", default="", help="only the issuers this tenant trusts")
    for name, what in (("remove", "stop trusting an issuer (for every tenant)"),
                       ("refresh", "fetch an issuer's key set now")):
        a = tsub.add_parser(name, help=what)
        a.add_argument("issuer")
    tr.set_defaults(func=functools.partial(run, connect=connect, emit=emit))
