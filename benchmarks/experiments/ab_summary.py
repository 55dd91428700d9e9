#!/usr/bin/env python
"""Summary of a Hopper A/B log (``hopper_ab.sh``): each variant's ratios to the portable kernel, their mean, the
mean against main's, and whether a variant wins.

    python benchmarks/experiments/ab_summary.py ab.log                  # one line per variant
    python benchmarks/experiments/ab_summary.py ab.log --win dqld       # exit 0 only if dqld wins (see below)

The log holds ``== <variant>`` headers, each followed by the lines of ``hopper_fwd_speed.py`` or
``hopper_bwd_speed.py`` (``... TFLOP/s: 1.12x (1.07-1.13) ...``; the backward's also end in ``dq <error>, ...``).
A variant wins if its mean ratio is at least ``--min-gain`` above main's, no case is more than ``--max-loss`` below
main's same case, and (backward) its largest dQ error stays under ``--max-dq``. A variant with fewer timed lines
than main (a crash, a timeout, a grep that missed) never wins, and every variant without a line is named on stderr,
so that a call does not go on as if it had measured.
"""

from __future__ import annotations

import argparse
import re
import sys

_RATIO = re.compile(r"TFLOP/s: (\d+\.\d+)x \(")
_DQ = re.compile(r"\bdq (\d+\.\d+e[-+]\d+)")


def parse(lines) -> dict[str, dict]:
    """``{variant: {"ratios": [...], "dq": largest dQ error or None}}`` in the log's order."""
    out, name = {}, None
    for line in lines:
        if line.startswith("== "):
            name = line.split()[1]
            out.setdefault(name, {"ratios": [], "dq": None})
            continue
        m = _RATIO.search(line)
        if m and name is not None:
            out[name]["ratios"].append(float(m.group(1)))
            dq = _DQ.search(line)
            if dq:
                out[name]["dq"] = max(out[name]["dq"] or 0.0, float(dq.group(1)))
    return out


def wins(rows: dict, name: str, min_gain: float, max_loss: float, max_dq: float) -> bool:
    main, var = rows.get("main", {}).get("ratios", []), rows.get(name, {}).get("ratios", [])
    if not main or len(var) != len(main):
        return False
    if rows[name]["dq"] is not None and rows[name]["dq"] >= max_dq:
        return False
    return (sum(var) >= (1 + min_gain) * sum(main)
            and min(b / a for a, b in zip(main, var)) >= 1 - max_loss)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--win", default="", help="the variant to judge against main (exit 0: it wins)")
    p.add_argument("--min-gain", type=float, default=0.02)
    p.add_argument("--max-loss", type=float, default=0.02)
    p.add_argument("--max-dq", type=float, default=1e-2)
    a = p.parse_args()
    with open(a.log) as f:
        rows = parse(f)
    base = sum(rows.get("main", {}).get("ratios", [])) or None
    for name, row in rows.items():
        r = row["ratios"]
        if not r:
            print(f"!! {name}: no timed line", file=sys.stderr)
            continue
        rel = f", {sum(r) / base:.3f}x main" if base and len(r) == len(rows["main"]["ratios"]) else ""
        dq = f", max dq error {row['dq']:.1e}" if row["dq"] is not None else ""
        print(f"{name}: {' '.join(f'{x:.2f}' for x in r)}, mean {sum(r) / len(r):.3f}{rel}{dq}")
    if a.win:
        ok = wins(rows, a.win, a.min_gain, a.max_loss, a.max_dq)
        print(f"{a.win}: {'WIN' if ok else 'no win'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
