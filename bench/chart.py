"""Draw the benchmark's results as one chart: CPU per fetch and fetches/s of every row.

Reads the JSON that run.py writes (``results/latest.json``) and writes an SVG (and, with
``--png``, a PNG to look at): one band per table (the poetry servers, the proxy from its
cache and on a miss, reloads, static files, workers), with the CPU µs per fetch on the
left (lower is better) and the fetches/s on the right (higher is better), each bar the
median over the rounds and its whisker the min-max. tend's rows are blue, twistd's
orange, the rest grey.

Needs matplotlib, which ``make -C bench venv`` installs into ``bench/.venv`` (not into the
project's venv: it is for the benchmark only)::

    bench/.venv/bin/python bench/chart.py results/latest.json results/chart.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import Patch

BENCH = Path(__file__).resolve().parent
TEND_BLUE = "#2a6fb0"
TWISTD_ORANGE = "#e08a2c"
OTHER_GREY = "#9a9a9a"

Json = dict[str, Any]
PLURAL = {"fetch": "fetches", "request": "requests"}

# (title, rows, unit of one fetch): the order of the bands, top to bottom.
BANDS: list[tuple[str, list[str], str]] = [
    (
        "Poetry server, 50 clients (server pinned to one core)",
        [
            "tend-asyncio",
            "tend-uvloop",
            "tend-uvloop-w2",
            "twistd",
            "bare-asyncio",
            "bare-uvloop",
            "bare-uvloop-log",
            "epoll-c",
        ],
        "fetch",
    ),
    (
        "Workers: pinned to one core, and sharing both with the load generator",
        ["tend-uvloop", "tend-uvloop-w2", "tend-uvloop-shared", "tend-uvloop-w2-shared"],
        "fetch",
    ),
    ("Poetry proxy, serving from its cache", ["tend-proxy", "twistd-proxy"], "fetch"),
    (
        "Poetry proxy on a cache miss, slow upstream (~100 ms a poem)",
        ["tend-proxy-miss", "twistd-proxy-miss"],
        "fetch",
    ),
    ("Reload every second under load", ["tend-steady", "tend-reload"], "fetch"),
    (
        "Static file, 2 KiB, HTTP/1.1 keep-alive",
        ["tend-web-2k", "twistd-web-2k", "http.server-2k"],
        "request",
    ),
    (
        "Static file, 1 MiB, HTTP/1.1 keep-alive",
        ["tend-web-1m", "twistd-web-1m", "http.server-1m"],
        "request",
    ),
]


def color_of(name: str) -> str:
    if name.startswith("tend"):
        return TEND_BLUE
    if name.startswith("twistd"):
        return TWISTD_ORANGE
    return OTHER_GREY


def figure_of(results: Json) -> tuple[list[tuple[str, list[tuple[str, Json]], str]], int]:
    """The bands that have measured rows, and how many bars they hold in all."""
    servers = results["servers"]
    bands = []
    for title, names, unit in BANDS:
        rows = [
            (name, servers[name]["summary"])
            for name in names
            if "summary" in servers.get(name, {})
            and servers[name]["summary"].get("cpu_us_per_fetch")
        ]
        if rows and not any(name.startswith("tend") for name, _ in rows):
            title += ": tend not measured in this run (see the notes in the tables)"
        if rows:
            bands.append((title, rows, unit))
    return bands, sum(len(rows) for _, rows, _ in bands)


def bars(axes: Axes, rows: list[tuple[str, Json]], key: str, digits: int) -> None:
    """Horizontal bars of summary[key]: median, with a min-max whisker and the value."""
    names = [name for name, _ in rows]
    medians = [summary[key]["median"] for _, summary in rows]
    low = [summary[key]["median"] - summary[key]["min"] for _, summary in rows]
    high = [summary[key]["max"] - summary[key]["median"] for _, summary in rows]
    positions = range(len(rows))
    axes.barh(
        positions,
        medians,
        xerr=[low, high],
        color=[color_of(name) for name in names],
        height=0.65,
        error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2},
    )
    axes.set_yticks(list(positions), names, fontsize=8.5)
    axes.invert_yaxis()
    top = max(summary[key]["max"] for _, summary in rows)
    axes.set_xlim(0, top * 1.22)
    for position, (_, summary) in zip(positions, rows, strict=True):
        axes.text(
            summary[key]["max"] + top * 0.015,
            position,
            f"{summary[key]['median']:,.{digits}f}",
            va="center",
            fontsize=7.5,
        )
    axes.tick_params(axis="x", labelsize=7.5)
    axes.grid(axis="x", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def draw(results: Json) -> plt.Figure:
    bands, total = figure_of(results)
    if not bands:
        raise SystemExit("chart.py: no measured rows in these results")
    meta = results["meta"]
    # Inches: a bar, the room a band's titles take, and the header above them all.
    bar, band_head, header = 0.3, 0.85, 1.2
    height = header + total * bar + len(bands) * band_head + 0.35
    figure, grid = plt.subplots(
        len(bands),
        2,
        figsize=(11, height),
        gridspec_kw={"height_ratios": [len(rows) for _, rows, _ in bands]},
        squeeze=False,
    )
    figure.subplots_adjust(
        left=0.16,
        right=0.98,
        top=1 - header / height,
        bottom=0.35 / height,
        wspace=0.42,
        # hspace is a fraction of the mean axes height.
        hspace=band_head / (total * bar / len(bands)),
    )
    for (title, rows, unit), (left, right) in zip(bands, grid, strict=True):
        bars(left, rows, "cpu_us_per_fetch", 1)
        bars(right, rows, "fetches_per_s", 0)
        left.set_title(f"server CPU µs per {unit} (lower is better)", loc="left", fontsize=8.5)
        right.set_title(f"{PLURAL[unit]}/s (higher is better)", loc="left", fontsize=8.5)
        top = left.get_position().y1
        figure.text(0.01, top + 0.36 / height, title, fontsize=10, fontweight="bold")
    rounds = results["settings"]["rounds"]
    figure.text(
        0.01,
        1 - 0.22 / height,
        "tend against twistd",
        fontsize=13,
        fontweight="bold",
        va="top",
    )
    figure.text(
        0.01,
        1 - 0.5 / height,
        f"Medians of {rounds} round(s), whiskers min\N{EN DASH}max. {meta['date']}; "
        f"{meta['cpus']} \N{MULTIPLICATION SIGN} {meta['cpu']}; "
        f"Python {meta['python']}, tend {meta['tend']}, Twisted {meta['twisted']}; "
        f"git {meta['git']}.",
        fontsize=8.5,
        va="top",
        color="#444444",
    )
    handles = [
        Patch(color=TEND_BLUE, label="tend"),
        Patch(color=TWISTD_ORANGE, label="twistd"),
        Patch(color=OTHER_GREY, label="reference"),
    ]
    figure.legend(
        handles=handles,
        loc="upper right",
        bbox_to_anchor=(0.98, 1 - 0.12 / height),
        ncols=3,
        fontsize=8.5,
        frameon=False,
    )
    return figure


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", type=Path, default=BENCH / "results" / "latest.json")
    parser.add_argument("output", nargs="?", type=Path, default=BENCH / "results" / "chart.svg")
    parser.add_argument("--png", type=Path, help="also write a PNG here, to look at")
    args = parser.parse_args(argv)
    results = json.loads(args.input.read_text())
    # The same results make the same file: no date, no random ids (git diffs stay small).
    plt.rcParams.update({"svg.hashsalt": "tend-bench", "svg.fonttype": "none"})
    figure = draw(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, format="svg", metadata={"Date": None})
    if args.png:
        figure.savefig(args.png, format="png", dpi=110)
    print(f"chart written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
