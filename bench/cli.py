"""``python -m bench``: parse the options, run the session, print the table, write the files.

``python -m bench soak ...`` is the soak instead (``bench.soak``): its own options, a report on
stdout and an exit status that says whether it passed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import build, peers, procs, report, soak
from bench.peers import PEER_NAMES
from bench.run import RESULTS_DIR, Options, run
from bench.workloads import WORKLOADS

DEFAULT_AGAINST = "nginx,haproxy,haproxy-splice"


def _names(text: str, known: Sequence[str], flag: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark tunnel against nginx and HAProxy on loopback.",
    )
    p.add_argument(
        "--against",
        default=DEFAULT_AGAINST,
        type=lambda t: _names(t, [n for n in PEER_NAMES if n != "tunnel"], "--against"),
        help="peers to compare with, comma-separated, or 'none'; one that is not installed is "
        f"skipped with the reason (default: {DEFAULT_AGAINST})",
    )
    p.add_argument(
        "--haproxy-pipesize",
        type=int,
        default=peers.HAPROXY_PIPESIZE,
        metavar="BYTES",
        help="tune.pipesize of the haproxy-splice peer; 0 leaves it unset, the kernel's "
        f"default (default: {peers.HAPROXY_PIPESIZE})",
    )
    p.add_argument(
        "--relay",
        choices=("auto", "splice", "copy"),
        default="auto",
        help="tunnel's server.relay (default: auto)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tunnel's server.workers, nginx's worker_processes and HAProxy's "
        "nbthread (default: 1)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions of each workload; medians are reported (default: 3, --quick: 1)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs, one repetition, 1,000 idle tunnels (under 3 minutes)",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds of tiny runs; checks the harness works (for tests)",
    )
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        type=lambda t: _names(t, WORKLOADS, "--only"),
        help=f"workloads to run, comma-separated (default: {','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="where to write <UTC timestamp>.md and .json (default: bench/results)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="clients reach every proxy over TLS (wss://; the backend side stays plain); "
        "needs libssl-dev for the load generator",
    )
    p.add_argument(
        "--chart",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the ratio chart (an SVG; always written as <stamp>.svg next to the "
        "results) to PATH, e.g. docs/img/benchmarks.svg",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="instead: the upgrade workload against tunnel with workers=1 and 2",
    )
    return p


def soak_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="Mixed traffic against one tunnel process; errors and fd/RSS drift.",
    )
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=float, help="how long to run (fractions allowed)")
    length.add_argument("--seconds", type=float, help="how long to run, for short runs")
    p.add_argument(
        "--tunnels",
        type=int,
        default=50,
        help="echo tunnels held open at once, besides the other workloads (default: 50)",
    )
    p.add_argument(
        "--relay",
        choices=("auto", "splice", "copy"),
        default="auto",
        help="tunnel's server.relay (default: auto)",
    )
    p.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    return p


def soak_main(argv: Sequence[str]) -> int:
    """Exit status 0 only when the soak passed (no error, drift within its bounds)."""
    args = soak_parser().parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if seconds <= 0 or args.tunnels < 0:
        soak_parser().error("the length must be positive and --tunnels 0 or more")
    options = soak.SoakOptions(seconds=seconds, tunnels=args.tunnels, relay=args.relay)
    try:
        result = soak.run_soak(options)
    except (build.BuildError, procs.ProcessError) as error:
        print(f"bench soak: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench soak: interrupted; the processes it started were stopped", file=sys.stderr)
        return 130
    print(result.report())
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_json(), indent=2) + "\n", encoding="utf-8")
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["soak"]:
        return soak_main(argv[1:])
    args = parser().parse_args(argv)
    if args.workers < 1 or (args.repeat is not None and args.repeat < 1):
        parser().error("--workers and --repeat must be 1 or more")
    if args.haproxy_pipesize < 0:
        parser().error("--haproxy-pipesize must be 0 or more")
    options = Options(
        against=args.against,
        relay=args.relay,
        workers=args.workers,
        plan="smoke" if args.smoke else "quick" if args.quick else "full",
        repeat=args.repeat,
        only=args.only or WORKLOADS,
        out=args.out,
        scaling=args.scaling,
        tls=args.tls,
        haproxy_pipesize=args.haproxy_pipesize,
    )
    try:
        session = run(options)
    except (build.BuildError, procs.ProcessError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; the processes it started were stopped", file=sys.stderr)
        return 130
    md_path, json_path = report.write(session, args.out)
    written = [md_path, json_path]
    chart = report.write_chart(session, md_path.with_suffix(".svg"))
    if chart is not None:
        written.append(chart)
        if args.chart is not None:
            written.append(report.write_chart(session, args.chart) or args.chart)
    elif args.chart is not None:
        print(f"bench: no chart for {args.chart}: no tunnel/peer ratio to draw", file=sys.stderr)
    print(report.table(session))
    print()
    for line in report.notes(session):
        print(f"- {line}")
    took = session.finished - session.started
    print(f"\nbench: wrote {', '.join(str(p) for p in written)} ({took:.0f} s)")
    return 0
