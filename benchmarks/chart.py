"""Draw benchmarks/results/latest.png from the figures run.py wrote (latest.json).

Run by run.py with the peers' virtualenv, where matplotlib lives: the
library itself never depends on it. One panel per scenario, one bar per
system, the same colour for a system everywhere.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "mpubsub (this)": "#d62728",
    "mpubsub 0.0.1": "#7f7f7f",
    "pyzmq proxy": "#1f77b4",
    "Redis pub/sub": "#ff7f0e",
    "blinker": "#2ca02c",
    "PyPubSub": "#9467bd",
    "mpubsub, two hosts via NATS": "#d62728",
    "nats-py alone": "#17becf",
    "asyncio mpubsub": "#ff9896",
    "asyncio mpubsub, uvloop": "#8c564b",
    "nats-py + nats-server": "#17becf",
    "paho-mqtt + mosquitto": "#bcbd22",
    "dbus-fast + dbus-daemon": "#aec7e8",
}


def main() -> None:
    spec: Dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    panels = spec["panels"]
    columns = 4
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows))
    for axis, panel in zip(axes.flat, panels):
        bars = {name: value for name, value in panel["bars"].items() if value is not None}
        names = list(bars)
        axis.bar(
            range(len(names)), list(bars.values()), color=[COLOURS.get(n, "#333333") for n in names]
        )
        for x, value in enumerate(bars.values()):
            if not value:  # a system that stopped moving gets no bar: say why
                axis.text(x, 0, "stalled", ha="center", va="bottom", fontsize=8, rotation=90)
        labels = [n.replace(" ", "\n", 1) for n in names]
        if len(names) > 4:  # crowded: names on more, shorter lines
            labels = [textwrap.fill(n, 9, break_long_words=False) for n in names]
        axis.set_xticks(range(len(names)), labels, fontsize=7 if len(names) <= 4 else 5.5)
        better = "higher is better" if panel["higher"] else "lower is better"
        axis.set_title(f"{panel['title']}\n{panel['unit']}, {better}", fontsize=9)
        axis.tick_params(axis="y", labelsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(f"mpubsub beside its peers - {spec['date']}, {spec['machine']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
