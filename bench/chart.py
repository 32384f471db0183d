"""The ratio chart: tunnel's figure divided by each peer's, one bar per row and peer, as SVG text.

Hand-written SVG so the bench needs no plotting library. The x axis is logarithmic, centred on
1.0x (a reference line): a bar to the left means tunnel costs less than that peer, to the right
more. Bars beyond ``LIMIT`` times either way are clipped (drawn to the edge with a notch); the
exact ratio is printed beside every bar either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

LIMIT = 10.0
"""The axis runs from 1/LIMIT to LIMIT."""
TICKS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
COLOURS = {"nginx": "#2a9d8f", "haproxy": "#e76f51", "haproxy-splice": "#8e5ea2"}
OTHER_COLOUR = "#777777"

WIDTH = 860
LABEL_X = 12
PLOT_LEFT = 300
PLOT_RIGHT = 740
VALUE_X = 752
BAR_HEIGHT = 12
BAR_GAP = 4
GROUP_GAP = 14
TOP = 92


def _x(ratio: float) -> float:
    """Where ``ratio`` falls on the log axis, clipped to its ends."""
    clipped = min(max(ratio, 1 / LIMIT), LIMIT)
    share = (math.log10(clipped) + math.log10(LIMIT)) / (2 * math.log10(LIMIT))
    return PLOT_LEFT + share * (PLOT_RIGHT - PLOT_LEFT)


def _tick_label(tick: float) -> str:
    return f"{tick:g}x"


def svg(
    title: str,
    subtitle: str,
    rows: Sequence[tuple[str, str]],
    peers: Sequence[str],
    ratios: Mapping[tuple[str, str], float | None],
) -> str:
    """The chart for ``rows`` ((key, label) pairs) against ``peers``; ``ratios[(key, peer)]`` is
    tunnel's figure over the peer's, or None where either is missing (drawn as "n/a")."""
    group = len(peers) * (BAR_HEIGHT + BAR_GAP) - BAR_GAP + GROUP_GAP
    height = TOP + len(rows) * group + 40
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="{LABEL_X}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LABEL_X}" y="40" fill="#444444">{escape(subtitle)}</text>',
    ]
    legend_x = LABEL_X
    for peer in peers:
        colour = COLOURS.get(peer, OTHER_COLOUR)
        out.append(
            f'<rect x="{legend_x}" y="52" width="12" height="12" fill="{colour}"/>'
            f'<text x="{legend_x + 16}" y="62">tunnel / {escape(peer)}</text>'
        )
        legend_x += 40 + 8 * len(f"tunnel / {peer}")
    bottom = TOP + len(rows) * group - GROUP_GAP + 6
    axis_y = TOP - 8
    out.append(
        f'<text x="{_x(1 / LIMIT)}" y="{axis_y - 6}" fill="#2a7a2a">← tunnel cheaper</text>'
        f'<text x="{_x(LIMIT)}" y="{axis_y - 6}" fill="#a33" text-anchor="end">'
        "tunnel dearer →</text>"
    )
    for tick in TICKS:
        x = _x(tick)
        colour, width = ("#000000", 1.5) if tick == 1.0 else ("#dddddd", 1)
        reference = ' class="reference"' if tick == 1.0 else ""
        out.append(
            f'<line{reference} x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{bottom}" '
            f'stroke="{colour}" stroke-width="{width}"/>'
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#444444">'
            f"{_tick_label(tick)}</text>"
        )
    one = _x(1.0)
    for index, (key, label) in enumerate(rows):
        top = TOP + index * group
        middle = top + (group - GROUP_GAP) / 2 + 4
        out.append(f'<text x="{LABEL_X}" y="{middle:.1f}">{escape(label)}</text>')
        for slot, peer in enumerate(peers):
            y = top + slot * (BAR_HEIGHT + BAR_GAP)
            text_y = y + BAR_HEIGHT - 2
            colour = COLOURS.get(peer, OTHER_COLOUR)
            ratio = ratios.get((key, peer))
            tags = f"data-row={quoteattr(key)} data-peer={quoteattr(peer)}"
            if ratio is None or ratio <= 0 or not math.isfinite(ratio):
                out.append(
                    f'<text class="missing" {tags} x="{one + 4:.1f}" y="{text_y}" '
                    f'fill="#777777">n/a</text>'
                )
                continue
            end = _x(ratio)
            left, right = min(one, end), max(one, end)
            out.append(
                f'<rect class="bar" {tags} data-ratio="{ratio:.6g}" x="{left:.1f}" y="{y}" '
                f'width="{max(right - left, 1.0):.1f}" height="{BAR_HEIGHT}" fill="{colour}">'
                f"<title>{escape(label)}: tunnel / {escape(peer)} = {ratio:.2f}x</title></rect>"
            )
            if ratio > LIMIT or ratio < 1 / LIMIT:  # clipped: a white notch at the clipped end
                notch = end - 3 if ratio > LIMIT else end + 1
                out.append(
                    f'<rect x="{notch:.1f}" y="{y}" width="2" height="{BAR_HEIGHT}" '
                    'fill="#ffffff"/>'
                )
            out.append(f'<text x="{VALUE_X}" y="{text_y}" fill="{colour}">{ratio:.2f}x</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
