"""Draw docs/rotation-timeline.svg: three consecutive keys of one tenant on
the schedule fedtoken.core.rotation derives, so the picture cannot drift
from the code (run it again after changing the formulas).

    .venv/bin/python scripts/rotation_timeline.py [--out docs/rotation-timeline.svg]

Hand-written SVG, no dependency. The example policy is a 7-day period, a
1-day maximum token lifetime and the default settings (JWKS max-age 300 s,
leeway 30 s), drawn to scale: with the default 30 days and 1 hour the grace
would be a sliver too thin to see.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from fedtoken.core.model import KeyRecord, KeyState
from fedtoken.core.rotation import DAY, DESTROY_SETTLE, StepKind, Timings, plan

PERIOD, LIFETIME = 7 * DAY, DAY
WIDTH, LEFT, RIGHT, ROW, TOP = 1000, 90, 30, 54, 70
COLORS = {"published": "#c9dcf2", "signing": "#2e7d32", "retiring": "#f2b84b"}


def _durations(seconds: int) -> str:
    if seconds % DAY == 0:
        return f"{seconds // DAY} d"
    if seconds >= DAY:
        return f"{seconds / DAY:.2f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds} s"


def simulate(timings: Timings) -> list[dict[str, int]]:
    """Drive the step machine for three rotations; the times of each key's steps."""
    sched = timings.of(PERIOD, LIFETIME)
    keys = {"k1": KeyRecord(kid="k1", tenant="t", alg="RS256", key_size=2048,
                            state=KeyState.ACTIVE, public_jwk={}, hsm_label="k1",
                            created_at=-sched.prepublish, activated_at=0)}
    times: dict[str, dict[str, int]] = {"k1": {"generated": -sched.prepublish, "active": 0}}
    now, n = 0, 1
    end = 3 * PERIOD + sched.grace + DESTROY_SETTLE + 1
    while now <= end:
        p = plan(sched, keys.values(), now)
        if p.due:
            step = p.due[0]
            if step.kind is StepKind.GENERATE:
                n += 1
                kid = f"k{n}"
                keys[kid] = KeyRecord(kid=kid, tenant="t", alg="RS256", key_size=2048,
                                      state=KeyState.PENDING, public_jwk={}, hsm_label=kid,
                                      created_at=now)
                times[kid] = {"generated": now}
            elif step.kind is StepKind.ACTIVATE:
                prev = keys[step.previous]
                keys[step.previous] = _with(prev, state=KeyState.RETIRING, retiring_at=now)
                times[step.previous]["retiring"] = now
                keys[step.kid] = _with(keys[step.kid], state=KeyState.ACTIVE, activated_at=now)
                times[step.kid]["active"] = now
            elif step.kind is StepKind.DESTROY_PRIVATE:
                keys[step.kid] = _with(keys[step.kid], private_destroyed_at=now)
                times[step.kid]["destroyed"] = now
            else:
                keys[step.kid] = _with(keys[step.kid], state=KeyState.RETIRED, retired_at=now)
                times[step.kid]["retired"] = now
            continue
        now = p.upcoming.at if p.upcoming is not None else end + 1
    return [times[f"k{i}"] for i in (1, 2, 3)]


def _with(k: KeyRecord, **changes: Any) -> KeyRecord:
    return dataclasses.replace(k, **changes)


def render(timings: Timings) -> str:
    sched = timings.of(PERIOD, LIFETIME)
    rows = simulate(timings)
    t0 = rows[0]["generated"]
    t1 = max(r.get("retired", 0) for r in rows) + PERIOD // 10
    span = t1 - t0

    def x(t: int) -> float:
        return LEFT + (t - t0) * (WIDTH - LEFT - RIGHT) / span

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
           f'height="{TOP + 3 * ROW + 150}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">Key rotation: three '
           f'consecutive keys (period {_durations(PERIOD)}, max token lifetime '
           f'{_durations(LIFETIME)})</text>',
           f'<text x="{LEFT}" y="44">prepublish {_durations(sched.prepublish)} = max(P/4, '
           f'max-age + leeway); grace {_durations(sched.grace)} = lifetime + JWKS max-age '
           f'{sched.jwks_max_age} s + leeway {sched.leeway} s; then unpublished</text>']
    for i, r in enumerate(rows):
        y = TOP + i * ROW
        label = f"key {i + 1}"
        out.append(f'<text x="10" y="{y + 22}">{escape(label)}</text>')
        gen, act = r["generated"], r["active"]
        ret = r.get("retiring", t1)
        unpub = r.get("retired", t1)
        bars = [(gen, act, "published", "published, not signing (PENDING)"),
                (act, ret, "signing", "signing (ACTIVE)"),
                (ret, unpub, "retiring", "published, not signing, private half destroyed "
                                          "(RETIRING)")]
        for start, stop, kind, title in bars:
            if stop <= start:
                continue
            w = max(2.0, x(stop) - x(start))
            out.append(f'<rect x="{x(start):.1f}" y="{y + 6}" width="{w:.1f}" height="24" '
                       f'fill="{COLORS[kind]}" stroke="#555" stroke-width="0.5">'
                       f'<title>{escape(title)}</title></rect>')
        out.append(f'<text x="{x(gen):.1f}" y="{y + 44}" font-size="10">generated</text>')
        out.append(f'<text x="{x(act) + 3:.1f}" y="{y + 23}" fill="white" '
                   'font-size="11">signs</text>')
        if "retired" in r:
            out.append(f'<line x1="{x(unpub):.1f}" y1="{y + 2}" x2="{x(unpub):.1f}" '
                       f'y2="{y + 34}" stroke="#b71c1c" stroke-width="2"/>')
            out.append(f'<text x="{x(unpub) + 4:.1f}" y="{y + 44}" font-size="10" '
                       'fill="#b71c1c">unpublished</text>')
    for d in range(0, 3 * PERIOD + 1, PERIOD):
        out.append(f'<line x1="{x(d):.1f}" y1="{TOP - 4}" x2="{x(d):.1f}" '
                   f'y2="{TOP + 3 * ROW}" stroke="#999" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{x(d) - 10:.1f}" y="{TOP + 3 * ROW + 14}" font-size="10">'
                   f'day {d // DAY}</text>')
    ly = TOP + 3 * ROW + 40
    legend = [("published", "published in the JWKS, not signing yet (PENDING)"),
              ("signing", "the one signing key (ACTIVE)"),
              ("retiring", "still published, never signs again, private half destroyed "
                           "in the HSM (RETIRING)")]
    for j, (kind, text) in enumerate(legend):
        out.append(f'<rect x="{LEFT}" y="{ly + j * 20}" width="18" height="12" '
                   f'fill="{COLORS[kind]}" stroke="#555" stroke-width="0.5"/>')
        out.append(f'<text x="{LEFT + 26}" y="{ly + j * 20 + 11}">{escape(text)}</text>')
    out.append(f'<text x="{LEFT}" y="{ly + 78}">red line: unpublished (RETIRED); every '
               'token the key signed has expired and every cache has seen it go</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "docs"
                        / "rotation-timeline.svg")
    args = parser.parse_args()
    args.out.write_text(render(Timings()), encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
