"""Bench output: the terminal table, the JSON document and a self-contained HTML report.

The HTML has no external assets: styles inline, plots as inline SVG drawn here.
"""

from __future__ import annotations

import html
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    info["mem_mib"] = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    try:
        import uvloop

        info["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        pass
    try:
        import aiohttp

        info["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    return info


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


RELAY_LABEL = "C relay (HAProxy TCP, splice)"


def _relay_rows(r: dict[str, Any]) -> list[list[str]]:
    """Under a scenario with the C relay: its figure in the proxy column against direct, and
    how the proxy compares with it."""
    if r.get("relay") is None:
        return []
    return [["", f"  {RELAY_LABEL} vs direct", _fmt(r["relay"]), _fmt(r.get("direct")),
             _fmt(r.get("relay_ratio")), r.get("unit", "")],
            ["", "  proxy / C relay", "", "", _fmt(r.get("proxy_vs_relay")), "x"]]


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """(scenario, figure, proxy, direct, ratio, unit) rows, headline plus notable details.

    Where the C relay ran, its rows put the relay's figure in the proxy column and
    relay / direct in the ratio column."""
    out: list[list[str]] = []
    for name, r in doc["scenarios"].items():
        if "error" in r and r.get("proxy") is None:
            out.append([name, "FAILED: " + r["error"][:100], "", "", "", ""])
            continue
        out.append([name, r.get("metric", ""), _fmt(r.get("proxy")), _fmt(r.get("direct")),
                    _fmt(r.get("ratio")), r.get("unit", "")])
        out.extend(_relay_rows(r))
        if name == "throughput":
            for phase in ("down", "up"):
                d = r.get("phases", {}).get(phase, {})
                out.append(["", f"  {phase} only", _fmt(d.get("proxy")), _fmt(d.get("direct")),
                            _fmt(d.get("ratio")), "MB/s"])
        elif name == "latency":
            for level, row in r.get("levels", {}).items():
                p, d = row.get("proxy", {}), row.get("direct", {})
                for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
                    if level == "1" and key == "p50_us":
                        continue
                    out.append(["", f"  {label} at {level} client(s)", _fmt(p.get(key)),
                                _fmt(d.get(key)), _fmt(row.get("ratio", {}).get(key)), "us"])
                c = row.get("relay")
                if c:
                    out.append(["", f"  C relay p99 at {level} client(s)", _fmt(c.get("p99_us")),
                                _fmt(d.get("p99_us")),
                                _fmt(row.get("relay_ratio", {}).get("p99_us")), "us"])
        elif name == "aggregate":
            out.extend(_aggregate_rows(r))
        elif name == "concurrency":
            det = r.get("details", {}).get("proxy", {})
            out.append(["", f"  proxy RSS at {r['details'].get('connections')} VCs",
                        _fmt(det.get("rss_mib")), "", "", "MiB"])
            out.append(["", "  proxy RSS per VC", _fmt(det.get("rss_per_vc_kib")), "", "",
                        "KiB"])
            if det.get("rss_per_used_vc_kib") is not None:
                out.append(["", "  proxy RSS per VC once it carried 64 KiB each way",
                            _fmt(det.get("rss_per_used_vc_kib")), "", "", "KiB"])
            out.append(["", "  proxy fds", _fmt(det.get("fds")), "", "", ""])
            if r["details"].get("relay_skipped"):
                out.append(["", f"  note: C relay skipped: {r['details']['relay_skipped']}",
                            "", "", "", ""])
        elif name == "soak":
            out.append(["", "  proxy RSS start/max/end", "/".join(
                _fmt(r.get(k)) for k in ("rss_start_mib", "rss_max_mib", "rss_end_mib")),
                "", "", "MiB"])
        if r.get("bottleneck") and r["bottleneck"] != "no process CPU-bound":
            out.append(["", f"  note: {r['bottleneck']}", "", "", "", ""])
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _scaling_rows(r: dict[str, Any], paths: dict[str, Any], what: str, unit: str,
                  ratio_key: str, compared_key: str, ratio_prefix: str) -> list[list[str]]:
    """One kind of path (proxy workers or relay threads): each against direct, its MB/s per
    core of its own CPU, then the higher count over the lower."""
    out: list[list[str]] = []
    for d in paths.values():
        n = d.get(unit + "s")
        label = f"  {what} {_plural(n, unit)}" if n else f"  {what}"
        if d.get("vcs_per_worker"):
            label += " (VCs per worker " + "/".join(str(x) for x in d["vcs_per_worker"]) + ")"
        out.append(["", label, _fmt(d.get("mb_s")), _fmt(r.get("direct")),
                    _fmt(d.get("ratio_vs_direct")), "MB/s"])
    kind = "proxy" if what == "proxy" else "relay"
    for name, d in paths.items():
        if d.get(f"mb_s_per_{kind}_core"):
            out.append(["", f"  {name}: MB/s per core of {kind} CPU",
                        _fmt(d[f"mb_s_per_{kind}_core"]), "", "", "MB/s"])
    if r.get(ratio_key) is not None:
        lo, hi = r[compared_key]
        out.append(["", f"  {ratio_prefix}{_plural(hi, unit)} / {_plural(lo, unit)}", "", "",
                    _fmt(r[ratio_key]), "x"])
    return out


def _aggregate_rows(r: dict[str, Any]) -> list[list[str]]:
    """Each proxy path against direct, 2 workers / 1, then (with the C relay) each relay path
    against direct and 2 threads / 1, then the cores each path's processes used."""
    paths = r.get("paths", {})
    relays = {name: d for name, d in paths.items() if name.startswith("relay-")}
    proxies = {name: d for name, d in paths.items() if name != "direct" and name not in relays}
    out = _scaling_rows(r, proxies, "proxy", "worker", "workers_ratio", "workers_compared", "")
    out += _scaling_rows(r, relays, "C relay", "thread", "relay_threads_ratio",
                         "relay_threads_compared", "C relay ")
    if r.get("relay_skipped"):
        out.append(["", f"  note: C relay skipped: {r['relay_skipped']}", "", "", "", ""])
    for name, c in r.get("cpu", {}).items():
        parts = []
        for group in ("loadgen", "proxy", "relay", "backend"):
            each = c.get(f"{group}_procs") or []
            if not each:
                continue
            text = f"{group} {c.get(f'{group}_cpu') or 0.0:.2f}"
            threads = c.get(f"{group}_threads") or []
            if len(each) > 1:
                text += f" ({len(each)} processes, busiest {max(each):.2f})"
            elif len(threads) > 1:
                text += (f" ({len(threads)} threads: "
                         + " + ".join(f"{x:.2f}" for x in threads) + ")")
            parts.append(text)
        parts.append(f"kernel irq {c.get('irq_cpu') or 0.0:.2f}, other processes "
                     f"{c.get('other_cpu') or 0.0:.2f}")
        out.append(["", f"  cores used, {name}: " + ", ".join(parts), "", "", "", ""])
    return out


def table(doc: dict[str, Any]) -> str:
    header = ["scenario", "figure", "proxy", "direct", "ratio", "unit"]
    body = rows(doc)
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i])
              for i in range(len(header))]
    widths[1] = min(widths[1], 70)

    def line(r: list[str]) -> str:
        if r[1].startswith(("  note:", "  cores used", "FAILED")):
            return (r[0].ljust(widths[0]) + "  " + r[1]).rstrip()  # never truncated
        cells = []
        for i, c in enumerate(r):
            c = c[: widths[i]]
            cells.append(c.rjust(widths[i]) if i in (2, 3, 4) else c.ljust(widths[i]))
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


# --- SVG --------------------------------------------------------------------------------------

_COLORS = {"proxy": "#d9480f", "direct": "#1864ab", "relay": "#868e96", "p50": "#2b8a3e",
           "p99": "#e67700",
           "p99.9": "#862e9c", "rss": "#d9480f", "fds": "#1864ab", "total": "#5f3dc4"}


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10.0 ** len(str(int(v)))
    for step in (0.1, 0.2, 0.25, 0.5, 1.0):
        if v <= mag * step:
            return float(mag * step)
    return mag


def _svg_frame(title: str, w: int, h: int, left: int, top: int, plot_h: float,
               vmax: float) -> list[str]:
    """The opening of a chart: the svg element, its title, and five labelled grid lines."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">'
             f'{html.escape(title)}</text>']
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{w - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{_fmt(vmax * i / 4)}</text>')
    return parts


def bar_chart(title: str, groups: list[str], series: dict[str, list[float | None]],
              unit: str) -> str:
    w, h, left, bottom, top = 560, 260, 60, 40, 30
    vmax = _nice_max(max((v for vs in series.values() for v in vs if v is not None),
                         default=1.0))
    plot_w, plot_h = w - left - 20, h - bottom - top
    gw = plot_w / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    parts = _svg_frame(title, w, h, left, top, plot_h, vmax)
    for gi, g in enumerate(groups):
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            if v is None:
                continue
            bh = plot_h * v / vmax
            x = left + gi * gw + gw * 0.1 + si * bw
            y = top + plot_h - bh
            color = _COLORS.get(name, "#888")
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" '
                         f'fill="{color}"><title>{html.escape(name)} {html.escape(g)}: '
                         f'{_fmt(v)} {unit}</title></rect>')
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">'
                         f'{_fmt(v)}</text>')
        parts.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{h - bottom + 16}" '
                     f'text-anchor="middle">{html.escape(g)}</text>')
    parts.append(_legend(list(series), left, h - 8))
    parts.append(f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 '
                 f'{top + plot_h / 2})" text-anchor="middle">{html.escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: list[str], x: float, y: float) -> str:
    out = []
    for i, n in enumerate(names):
        xx = x + i * 110
        out.append(f'<rect x="{xx}" y="{y - 9}" width="10" height="10" '
                   f'fill="{_COLORS.get(n, "#888")}"/><text x="{xx + 14}" y="{y}">'
                   f'{html.escape(n)}</text>')
    return "".join(out)


def line_chart(title: str, xs: list[float], series: dict[str, list[float | None]],
               xlabel: str, ylabel: str, *, log_x: bool = False) -> str:
    import math

    legend_rows = (len(series) + 2) // 3
    w, h, left, top = 560, 250 + 16 * legend_rows, 60, 30
    bottom = 40 + 16 * legend_rows
    plot_w, plot_h = w - left - 20, h - bottom - top
    vals = [v for vs in series.values() for v in vs if v is not None]
    vmax = _nice_max(max(vals, default=1.0))
    if not xs:
        return ""

    def fx(x: float) -> float:
        lo, hi = min(xs), max(xs)
        if log_x and lo > 0:
            lo, hi, x = math.log10(lo), math.log10(hi), math.log10(x)
        return left + (plot_w * (x - lo) / (hi - lo) if hi > lo else plot_w / 2)

    def fy(v: float) -> float:
        return top + plot_h - plot_h * v / vmax

    parts = _svg_frame(title, w, h, left, top, plot_h, vmax)
    for x in sorted(set(xs)):
        label = str(int(x)) if float(x).is_integer() else _fmt(x)
        parts.append(f'<text x="{fx(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                     f'{label}</text>')
    for name, ys in series.items():
        pts = [(fx(x), fy(y)) for x, y in zip(xs, ys, strict=False) if y is not None]
        if not pts:
            continue
        color = _COLORS.get(name.split()[-1], _COLORS.get(name.split()[0], "#888"))
        dash = _dash(name)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
    for i, name in enumerate(series):
        color = _COLORS.get(name.split()[-1], _COLORS.get(name.split()[0], "#888"))
        xx = left + (i % 3) * 165
        legend_y = top + plot_h + 46 + 16 * (i // 3)
        dash = _dash(name)
        parts.append(f'<line x1="{xx}" x2="{xx + 16}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
                     f'stroke="{color}" stroke-width="2"{dash}/>'
                     f'<text x="{xx + 20}" y="{legend_y}">{html.escape(name)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 28}" text-anchor="middle">'
                 f'{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 '
                 f'{top + plot_h / 2})" text-anchor="middle">{html.escape(ylabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _dash(name: str) -> str:
    """Line style of a series: proxy solid, direct dashed, the C relay dotted."""
    if name.startswith("direct"):
        return ' stroke-dasharray="5,3"'
    if name.startswith("relay"):
        return ' stroke-dasharray="1,3"'
    return ""


def _plots(doc: dict[str, Any]) -> list[str]:
    sc = doc["scenarios"]
    plots: list[str] = []
    t = sc.get("throughput")
    if t and "phases" in t:
        groups = [g for g in ("both", "down", "up") if g in t["phases"]]
        plots.append(bar_chart(
            "Throughput of one virtual connection (64 KiB PDUs)", groups,
            {p: [t["phases"][g].get(p) for g in groups] for p in ("proxy", "direct", "relay")
             if any(t["phases"][g].get(p) is not None for g in groups)},
            "MB/s"))
    agg = sc.get("aggregate")
    if agg and agg.get("paths"):
        names = list(agg["paths"])
        plots.append(bar_chart(
            f"Total throughput of {agg.get('vcs')} virtual connections (64 KiB PDUs)",
            names, {"total": [agg["paths"][n].get("mb_s") for n in names]}, "MB/s"))
    lat = sc.get("latency")
    if lat and "levels" in lat:
        levels = sorted(int(k) for k in lat["levels"])
        series: dict[str, list[float | None]] = {}
        for path in ("proxy", "direct", "relay"):
            for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
                vals = [lat["levels"][str(n)].get(path, {}).get(key) for n in levels]
                if any(v is not None for v in vals):
                    series[f"{path} {label}"] = vals
        plots.append(line_chart("Small-call round trip vs concurrent clients", [float(x) for x in
                                levels], series, "clients", "us", log_x=True))
    conc = sc.get("concurrency")
    if conc and conc.get("rss_curve"):
        curve = conc["rss_curve"]
        plots.append(line_chart("Proxy RSS vs idle virtual connections",
                                [float(c["vcs"]) for c in curve],
                                {"rss": [c["rss_mib"] for c in curve]}, "virtual connections",
                                "MiB"))
    soak = sc.get("soak")
    if soak and soak.get("samples"):
        s = soak["samples"]
        plots.append(line_chart("Soak: proxy RSS over time", [float(x["t"]) for x in s],
                                {"rss": [x["rss_mib"] for x in s]}, "seconds", "MiB"))
        plots.append(line_chart("Soak: proxy open fds over time", [float(x["t"]) for x in s],
                                {"fds": [float(x["fds"]) for x in s]}, "seconds", "fds"))
    return [p for p in plots if p]


def write_html(doc: dict[str, Any], path: str | Path) -> None:
    head = ["scenario", "figure", "proxy", "direct", "ratio", "unit"]
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows(doc))
    machine = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                      for k, v in doc.get("machine", {}).items())
    errors = "".join(f"<li>{html.escape(e)}</li>" for e in doc.get("errors", []))
    relay = doc.get("machine", {}).get("relay")
    relay_text = (f"C relay rows: {html.escape(str(relay.get('version') or 'HAProxy'))} in TCP "
                  "mode between the direct clients and the backend, its figure in the proxy "
                  "column and relay / direct as ratio (aggregate: with 1 and with 2 threads)."
                  if relay else "")
    status = ("<p class=ok>All data verified end to end.</p>" if doc.get("ok")
              else f"<p class=bad>FAILED:</p><ul>{errors}</ul>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rpcproxy-bench report</title>
<style>
body{{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}
td:nth-child(3),td:nth-child(4),td:nth-child(5){{text-align:right}}
.ok{{color:#2b8a3e;font-weight:bold}} .bad{{color:#c92a2a;font-weight:bold}}
.plots svg{{margin:8px;border:1px solid #eee}}
</style></head><body>
<h1>rpcproxy-bench</h1>
<p>Started {html.escape(str(doc.get("started", "")))}, duration per scenario
{html.escape(str(doc.get("config", {}).get("duration")))} s. Ratio = proxy / direct.
{relay_text}</p>
{status}
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{trs}</table>
<div class="plots">{"".join(_plots(doc))}</div>
<h2>Machine</h2><table>{machine}</table>
<h2>Raw data</h2><pre>{html.escape(json.dumps(doc, indent=1))}</pre>
</body></html>
"""
    Path(path).write_text(page)
