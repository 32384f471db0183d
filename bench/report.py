"""From samples to the one table: medians per peer and metric, ratios, flags, machine info;
written as Markdown and JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import chart, peers
from bench.run import Session
from bench.workloads import LOADGEN_BUSY, Plan, Sample

NOT_APPLICABLE = "—"
MISSING = "n/a"
BUSY_MARK = "†"
RATIO_PEERS = ("nginx", "haproxy", "haproxy-splice")
LATENCY_PREFIXES = {"latency": "added", "latency10": "added10"}
"""Latency workloads and the prefix of their "added over direct" figures."""


def chart_rows(plan: Plan) -> list[tuple[str, str]]:
    """The per-unit rows the chart draws (all lower-is-better), with their short labels."""
    return [
        ("upgrade_cpu_us", "proxy CPU per upgrade"),
        ("echo_cpu_us", f"proxy CPU per {plan.message_size} B message"),
        ("bulk_cpu_s_per_gib", f"proxy CPU per GiB, {plan.bulk_conns} conns"),
        ("bulk1_cpu_s_per_gib", f"proxy CPU per GiB, {plan.bulk1_conns} conn"),
        ("added10_p50_us", f"added RTT p50, {plan.latency10_conns} conns"),
        ("idle_rss_kib", "RSS per idle tunnel"),
    ]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    workload: str
    better: str
    proxy_only: bool = False
    """Figures of the proxy itself (CPU, memory, added latency): not applicable to ``direct``."""
    busy_marks: bool = False
    """Throughput figures, which a saturated load generator caps: marked when that happened."""


def rows(plan: Plan, tls: bool = False) -> list[Row]:
    """The table's rows. Over TLS the keys are the same; the labels say that an upgrade then
    includes a full TLS handshake and that the idle tunnels are TLS ones."""
    rate = f"{plan.latency_rate:,.0f} msg/s"
    rate10 = f"{rate}, {plan.latency10_conns} conns"
    rate50 = f"{rate}, {plan.echo_conns} conns"
    chunks = f"{plan.bulk_chunk // 1024} KiB chunks echoed"
    upgrade = "TLS handshakes + upgrades" if tls else "upgrades"
    per_upgrade = "TLS handshake + upgrade" if tls else "upgrade"
    idle = "idle TLS tunnel" if tls else "idle tunnel"
    return [
        Row(
            "upgrade_rate",
            f"{upgrade}/s ({plan.upgrade_conns} conns)",
            "upgrade",
            "higher",
            busy_marks=True,
        ),
        Row(
            "upgrade_cpu_us",
            f"proxy CPU per {per_upgrade} (µs)",
            "upgrade",
            "lower",
            proxy_only=True,
        ),
        Row("upgrade_machine_cpu_us", f"machine CPU per {per_upgrade} (µs)", "upgrade", "lower"),
        Row(
            "echo_rate",
            f"echo msg/s ({plan.message_size} B, {plan.echo_conns} conns, closed loop)",
            "echo",
            "higher",
            busy_marks=True,
        ),
        Row(
            "echo_cpu_us",
            f"proxy CPU per {plan.message_size} B message (µs)",
            "echo",
            "lower",
            proxy_only=True,
        ),
        Row(
            "echo_machine_cpu_us",
            f"machine CPU per {plan.message_size} B message (µs)",
            "echo",
            "lower",
        ),
        Row("latency_p50_us", f"RTT p50 at {rate50} (µs)", "latency", "lower"),
        Row("latency_p99_us", f"RTT p99 at {rate50} (µs)", "latency", "lower"),
        Row("added_p50_us", "added p50 vs direct (µs)", "latency", "lower", proxy_only=True),
        Row("added_p99_us", "added p99 vs direct (µs)", "latency", "lower", proxy_only=True),
        Row("latency10_p50_us", f"RTT p50 at {rate10} (µs)", "latency10", "lower"),
        Row("latency10_p99_us", f"RTT p99 at {rate10} (µs)", "latency10", "lower"),
        Row(
            "added10_p50_us",
            f"added p50 vs direct, {plan.latency10_conns} conns (µs)",
            "latency10",
            "lower",
            proxy_only=True,
        ),
        Row(
            "added10_p99_us",
            f"added p99 vs direct, {plan.latency10_conns} conns (µs)",
            "latency10",
            "lower",
            proxy_only=True,
        ),
        Row(
            "bulk_mb_s",
            f"bulk MB/s ({plan.bulk_conns} conns, {chunks})",
            "bulk",
            "higher",
            busy_marks=True,
        ),
        Row(
            "bulk_cpu_s_per_gib",
            f"proxy CPU s per GiB sent ({plan.bulk_conns} conns)",
            "bulk",
            "lower",
            proxy_only=True,
        ),
        Row(
            "bulk_machine_cpu_s_per_gib",
            f"machine CPU s per GiB sent ({plan.bulk_conns} conns)",
            "bulk",
            "lower",
        ),
        Row(
            "bulk1_mb_s",
            f"bulk1 MB/s (ONE conn, {chunks})",
            "bulk1",
            "higher",
            busy_marks=True,
        ),
        Row(
            "bulk1_cpu_s_per_gib",
            "proxy CPU s per GiB sent (1 conn)",
            "bulk1",
            "lower",
            proxy_only=True,
        ),
        Row(
            "bulk1_machine_cpu_s_per_gib",
            "machine CPU s per GiB sent (1 conn)",
            "bulk1",
            "lower",
        ),
        Row(
            "idle_rss_kib",
            f"RSS per {idle} (KiB, {plan.idle_tunnels:,} open)",
            "idle",
            "lower",
            proxy_only=True,
        ),
    ]


def medians(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Median of every metric per peer over the repetitions that did not fail; plus the added
    latency, proxied minus direct (medians of each)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        if sample.failure is None:
            for key, value in sample.metrics.items():
                values[sample.peer][key].append(value)
    result = {
        peer: {key: statistics.median(vals) for key, vals in metrics.items()}
        for peer, metrics in values.items()
    }
    direct = result.get("direct", {})
    for peer, metrics in result.items():
        if peer == "direct":
            continue
        for workload, added in LATENCY_PREFIXES.items():
            for quantile in ("p50", "p99"):
                key = f"{workload}_{quantile}_us"
                if key in metrics and key in direct:
                    metrics[f"{added}_{quantile}_us"] = metrics[key] - direct[key]
    return result


def busy(samples: Sequence[Sample]) -> set[tuple[str, str]]:
    """(peer, workload) pairs where the load generator was above LOADGEN_BUSY of a core."""
    return {(s.peer, s.workload) for s in samples if s.loadgen_busy}


def totals(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for sample in samples:
        counts[sample.peer]["errors"] += sample.errors
        counts[sample.peer]["mismatches"] += sample.mismatches
        counts[sample.peer]["failures"] += sample.failure is not None
        counts[sample.peer]["log_problems"] += len(sample.problems)
    return {peer: dict(c) for peer, c in counts.items()}


def number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or numerator <= 0 or denominator <= 0:
        return MISSING
    return f"{numerator / denominator:.2f}x"


TLS_METRIC = "metric (over TLS)"
DIRECT_PLAIN = "direct (plain)"


def compared(session: Session) -> list[str]:
    """The peers that get a tunnel/peer ratio column (and a bar in the chart)."""
    if "tunnel" not in session.peers:
        return []
    return [p for p in RATIO_PEERS if p in session.peers]


def comparison_table(session: Session) -> tuple[list[str], list[list[str]]]:
    """The table: one row per metric, one column per peer, then tunnel/nginx, tunnel/haproxy.
    Over TLS the first header cell says so, and ``direct`` (the backend has no TLS) is labelled
    as the plain reference it is."""
    med = medians(session.samples)
    flagged = busy(session.samples)
    count = totals(session.samples)
    columns = list(session.peers)
    tls = session.options.tls
    ratio_peers = compared(session)
    shown = [DIRECT_PLAIN if tls and c == "direct" else c for c in columns]
    header = [TLS_METRIC if tls else "metric", *shown, *(f"tunnel/{p}" for p in ratio_peers)]
    body: list[list[str]] = []
    for row in rows(session.plan, tls):
        if row.workload not in session.options.only:
            continue
        cells = [f"{row.label} {'↑' if row.better == 'higher' else '↓'}"]
        for peer in columns:
            if row.proxy_only and peer == "direct":
                cells.append(NOT_APPLICABLE)
                continue
            value = med.get(peer, {}).get(row.key)
            text = MISSING if value is None else number(value)
            if row.busy_marks and (peer, row.workload) in flagged and value is not None:
                text += BUSY_MARK
            cells.append(text)
        tunnel = med.get("tunnel", {}).get(row.key)
        cells += [ratio(tunnel, med.get(p, {}).get(row.key)) for p in ratio_peers]
        body.append(cells)
    errors = ["errors / mismatches (all runs)"]
    for peer in columns:
        c = count.get(peer, {})
        errors.append(f"{c.get('errors', 0)} / {c.get('mismatches', 0)}")
    body.append(errors + [""] * len(ratio_peers))
    return header, body


def scaling_table(session: Session) -> tuple[list[str], list[list[str]]]:
    med = medians(session.samples)
    one, two = "tunnel w1", "tunnel w2"
    header = ["metric", one, two, "w2/w1"]
    body: list[list[str]] = []
    supported = bool(session.scaling.get(two, {}).get("supported"))
    upgrade = "TLS handshakes + upgrades" if session.options.tls else "upgrades"
    per_upgrade = "TLS handshake + upgrade" if session.options.tls else "upgrade"
    for key, label in (
        ("upgrade_rate", f"{upgrade}/s ({session.plan.upgrade_conns} conns) ↑"),
        ("upgrade_cpu_us", f"proxy CPU per {per_upgrade}, all processes (µs) ↓"),
    ):
        a, b = med.get(one, {}).get(key), med.get(two, {}).get(key)
        cells = [label, MISSING if a is None else number(a), MISSING if b is None else number(b)]
        cells.append(ratio(b, a) if supported else "unsupported")
        body.append(cells)
    processes = ["processes measured"]
    for label in (one, two):
        processes.append(str(session.scaling.get(label, {}).get("processes", MISSING)))
    body.append([*processes, ""])
    return header, body


def render(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table, padded so that it also reads well in a terminal."""
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    # left-aligned metric names, right-aligned figures
    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def table(session: Session) -> str:
    if "tls" in session.skipped:
        return f"TLS workloads skipped: {session.skipped['tls']}"
    if session.options.scaling:
        return render(*scaling_table(session))
    return render(*comparison_table(session))


def notes(session: Session) -> list[str]:
    """What the reader must know to read the table: flags, skips, failures, log problems."""
    lines: list[str] = []
    plan = session.plan
    if not session.options.scaling:
        lines.append(
            f"Medians of {plan.repeat} repetition(s). ↑ higher is better, ↓ lower is better; "
            "ratio columns are tunnel's figure divided by the peer's."
        )
        only = session.options.only
        if "bulk" in only:
            lines.append(
                "MB/s = 10^6 bytes/s of client payload (each byte crosses the proxy twice: up "
                "and echoed back); GiB = 2^30 client-sent bytes."
            )
        if MACHINE_WORKLOADS & set(only):
            lines += machine_notes(session)
        if "idle" in only:
            lines.append(
                f"RSS per tunnel = (RSS with {plan.idle_tunnels:,} tunnels open - RSS just "
                "before) / tunnels, on a freshly started proxy."
            )
    if session.options.tls and "tls" not in session.skipped:
        lines += tls_notes(session)
    o = session.options
    workers = "1 and 2" if o.scaling else str(o.workers)
    lines.append(f"tunnel: relay={o.relay}, workers={workers} ({peers.version('tunnel')})")
    flagged = sorted(busy(session.samples))
    if flagged:
        pairs = ", ".join(f"{peer} {workload}" for peer, workload in flagged)
        lines.append(
            f"{BUSY_MARK} the load generator used more than {LOADGEN_BUSY:.0%} of a core "
            f"({pairs}): that figure is bounded by the load generator (and the shared cores), "
            "not by the proxy."
        )
    for name, reason in session.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    two = session.scaling.get("tunnel w2", {})
    if session.options.scaling and not two.get("supported", False):
        lines.append(f"workers=2 unsupported: {two.get('reason', 'no measurement')}")
    elif session.options.scaling:
        lines.append(
            f"Medians of {plan.repeat} repetition(s). workers=2 ran {two.get('processes')} "
            f"processes (CPU summed over all); the machine's {os.cpu_count()} cores are shared "
            "with the load generator and the backend, which bounds the ratio."
        )
    for sample in session.samples:
        if sample.failure:
            lines.append(
                f"FAILED {sample.peer} {sample.workload} #{sample.repetition + 1}: {sample.failure}"
            )
    count = totals(session.samples)
    for peer, c in count.items():
        if c["errors"] or c["mismatches"]:
            firsts = {
                s.loadgen.get("first_error")
                for s in session.samples
                if s.peer == peer and s.loadgen.get("first_error")
            }
            lines.append(
                f"{peer}: {c['errors']} error(s), {c['mismatches']} mismatch(es); first: "
                + "; ".join(sorted(str(f) for f in firsts))
            )
        if c["log_problems"]:
            shown = [line for s in session.samples if s.peer == peer for line in s.problems][:3]
            lines.append(
                f"{peer} logged {c['log_problems']} warning(s)/error(s), e.g.: " + " | ".join(shown)
            )
    if session.source_at_start and peers.tunnel_source() != session.source_at_start:
        lines.append(
            "tunnel/ changed while the session ran (a commit or an edit): processes started "
            "later (the idle test restarts the proxy) may have run different code."
        )
    lines += session.notes
    return lines


MACHINE_WORKLOADS = {"upgrade", "echo", "bulk", "bulk1"}
"""The workloads that have machine CPU rows."""


def machine_notes(session: Session) -> list[str]:
    """What the machine CPU rows are, and how much of them other jobs may be."""
    lines = [
        "machine CPU = busy core-seconds of the whole machine over the run (/proc/stat: "
        "user + nice + system + irq + softirq + steal) per unit of work, nothing "
        "subtracted: it includes the load generator, the backend, the kernel's softirq "
        "work and anything else running (direct shows the part without a proxy)."
    ]
    machine_total = sum(s.machine_cpu_seconds or 0.0 for s in session.samples)
    if machine_total > 0:
        elsewhere = sum(s.unattributed_cpu_seconds or 0.0 for s in session.samples)
        lines.append(
            f"Of the machine CPU over all measured runs, {elsewhere / machine_total:.0%} was "
            "charged to none of the proxy, the backend and the load generator (kernel "
            "threads, interrupt work charged to no process, other jobs)."
        )
    if session.background_cores is not None:
        lines.append(
            f"Before the session, with none of its processes running, the machine was busy "
            f"{session.background_cores:.2f} of {os.cpu_count()} cores; the load average "
            f"was {os.getloadavg()[0]:.1f} at the end. Other jobs' CPU is inside the machine "
            "CPU rows."
        )
    return lines


def negotiated(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per peer: what its TLS handshakes negotiated (from the load generator's first one in each
    run; any run that differs is listed too) and the counts over all runs: handshakes, resumed
    ones, session tickets received, EOFs without close_notify."""
    result: dict[str, dict[str, Any]] = {}
    counters = ("handshakes", "resumed", "tickets", "unclean_eof")
    for sample in samples:
        tls = sample.loadgen.get("tls")
        if not isinstance(tls, dict) or not tls.get("version"):
            continue
        entry = result.setdefault(sample.peer, {"negotiated": [], **dict.fromkeys(counters, 0)})
        what = " ".join(str(tls.get(k)) for k in ("version", "cipher", "group") if tls.get(k)) + (
            f" ALPN {tls['alpn']}" if tls.get("alpn") else " no ALPN"
        )
        if what not in entry["negotiated"]:
            entry["negotiated"].append(what)
        for key in counters:
            entry[key] += int(tls.get(key, 0))
    return result


def tls_notes(session: Session) -> list[str]:
    text = (
        "Over TLS: the load generator connects with TLS (1.3 offered, SNI localhost, no "
        "certificate verification) and never resumes a session, so every upgrade is a full "
        "handshake, the cost of a new client. Each proxy terminates TLS with the same EC P-256 "
        "certificate and policy; the backend side is plain."
    )
    if "direct" in session.peers:
        text += (
            f" `{DIRECT_PLAIN}` is the load generator talking plain ws:// to the backend: a "
            "reference without TLS, so the added latency includes TLS at both ends."
        )
    lines = [text]
    for peer, entry in negotiated(session.samples).items():
        handshakes = entry["handshakes"]
        tickets = entry["tickets"] / handshakes if handshakes else 0.0
        lines.append(
            f"TLS with {peer}: {' / '.join(entry['negotiated'])}; {handshakes:,} handshakes, "
            f"{entry['resumed']} resumed, {tickets:.1f} session tickets per handshake, "
            f"{entry['unclean_eof']:,} closes without close_notify."
        )
    return lines


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(session: Session) -> dict[str, Any]:
    source = peers.tunnel_source()
    names = ["tunnel", *session.options.against]
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "compiler": session.binaries.compiler if session.binaries else None,
        "versions": {name: peers.version(name) for name in names},
        "tunnel_commit": session.source_at_start.get("commit", source["commit"]),
        "tunnel_dirty": session.source_at_start.get("dirty", source["dirty"]),
        "tunnel_changed_during_run": source != session.source_at_start,
        "tunnel_source_at_end": source,
        "load_average": os.getloadavg(),
    }


def stamp(session: Session) -> str:
    """The results' file name: the UTC start time, with ``-tls`` for a TLS session."""
    suffix = "-tls" if session.options.tls else ""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(session.started)) + suffix


def to_json(session: Session, info: dict[str, Any]) -> dict[str, Any]:
    header, body = scaling_table(session) if session.options.scaling else comparison_table(session)
    options = dataclasses.asdict(session.options)
    tls: dict[str, Any] = {"enabled": session.options.tls}
    if session.options.tls:
        tls["skipped"] = session.skipped.get("tls")
        tls["peers"] = negotiated(session.samples)
    options["out"] = str(session.options.out)
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session.started)),
        "duration_seconds": round(session.finished - session.started, 1),
        "command": " ".join(sys.argv) if sys.argv else "",
        "machine": info,
        "options": options,
        "plan": dataclasses.asdict(session.plan),
        "peers": session.peers,
        "skipped": session.skipped,
        "configs": session.configs,
        "medians": medians(session.samples),
        "totals": totals(session.samples),
        "table": {"header": header, "rows": body},
        "notes": notes(session),
        "scaling": session.scaling,
        "background_cores": session.background_cores,
        "tls": tls,
        "samples": [dataclasses.asdict(s) for s in session.samples],
    }


def to_markdown(session: Session, info: dict[str, Any]) -> str:
    versions = ", ".join(dict.fromkeys(info["versions"].values()))  # haproxy-splice is haproxy
    dirty = " (tunnel/ had uncommitted changes)" if info["tunnel_dirty"] else ""
    if info["tunnel_changed_during_run"]:
        dirty += f"; at the end: {info['tunnel_source_at_end']['commit']}"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(session.started))
    o = session.options
    title = "tunnel benchmark over TLS (wss://)" if o.tls else "tunnel benchmark"
    clients = ["- clients: TLS (wss://) to every proxy, plain ws:// from them to the backend"]
    lines = [
        f"# {title}, {when}",
        "",
        f"- command: `{' '.join(['python -m bench', *sys.argv[1:]])}`",
        f"- machine: {info['cpu_model']}, {info['cores']} cores, {info['kernel']}, "
        f"{info['python']}, {info['compiler']}",
        f"- peers: {versions}",
        f"- tunnel commit: {info['tunnel_commit']}{dirty}",
        f"- plan: {session.plan.name}, relay={o.relay}, workers={o.workers}, "
        f"repeat={session.plan.repeat}, took {session.finished - session.started:.0f} s",
        *(clients if o.tls else []),
        "",
        table(session),
        "",
        *(f"- {line}" for line in notes(session)),
        "",
    ]
    return "\n".join(lines)


def write(session: Session, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<stamp>.md`` and ``<stamp>.json`` into ``out_dir``; return both paths."""
    info = machine(session)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = stamp(session)
    name, n = base, 1
    while (out_dir / f"{name}.json").exists():
        n += 1
        name = f"{base}-{n}"
    markdown = to_markdown(session, info)
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(markdown, encoding="utf-8")
    json_path.write_text(
        json.dumps(to_json(session, info), indent=1, default=str) + "\n", encoding="utf-8"
    )
    return md_path, json_path


def chart_ratios(session: Session) -> dict[tuple[str, str], float | None]:
    """tunnel's median over each compared peer's, for every ``chart_rows`` key; None when either
    figure is missing or not positive (an added latency within noise can come out negative)."""
    med = medians(session.samples)
    result: dict[tuple[str, str], float | None] = {}
    for key, _ in chart_rows(session.plan):
        tunnel = med.get("tunnel", {}).get(key)
        for peer in compared(session):
            other = med.get(peer, {}).get(key)
            positive = tunnel is not None and other is not None and tunnel > 0 and other > 0
            result[(key, peer)] = tunnel / other if positive and tunnel and other else None
    return result


def chart_svg(session: Session) -> str | None:
    """The ratio chart of this session as SVG text; None when there is no ratio to draw."""
    peers_shown = compared(session)
    workload = {row.key: row.workload for row in rows(session.plan)}
    shown_rows = [
        (k, label) for k, label in chart_rows(session.plan) if workload[k] in session.options.only
    ]
    if not peers_shown or not shown_rows or session.options.scaling:
        return None
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(session.started))
    commit = str(session.source_at_start.get("commit", ""))[:7]
    over = " over TLS" if session.options.tls else ""
    title = f"tunnel / peer, per unit of work{over} (lower is better for tunnel)"
    subtitle = (
        f"python -m bench, {session.plan.name} plan, medians of {session.plan.repeat}, "
        f"{when}, tunnel {commit}, relay={session.options.relay}; log scale, 1.0x = equal"
    )
    return chart.svg(title, subtitle, shown_rows, peers_shown, chart_ratios(session))


def write_chart(session: Session, path: Path) -> Path | None:
    """Write the ratio chart to ``path`` (directories made as needed); None if there is none."""
    text = chart_svg(session)
    if text is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
