"""The outputs of a run: JSON, CSV, Markdown, the PNG plot and the terminal table.

The terminal table uses ``rich`` and the plot ``matplotlib`` (the ``bench`` extra of the package); without them
the table is printed as plain Markdown and the plot is left out, each with a note saying what to install.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .api import COLUMNS, PASSES

MISSING_EXTRA = "pip install 't3d-kernels[bench]'"


def write_json(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _kind(row: dict[str, Any]) -> str:
    """ "ok", "noisy", "error" or "skipped"."""
    return row["status"].split(":", 1)[0]


def _columns(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Which optional columns this set of rows needs."""
    return {
        "precision": len({r.get("precision") for r in rows if r.get("precision")}) > 1,
        "clips": any(r.get("op") == "model" and r.get("clips_per_s") is not None for r in rows),
        "peak": any(r.get("peak_mb") is not None for r in rows),
    }


def _cells(r: dict[str, Any], opt: dict[str, bool], note: str, split: bool = False) -> list[str]:
    """One row's cells: case (``split``: op, shape), pass, [precision], contender, ms, IQR, speed-up, GFLOP/s,
    % roof, [clips/s], saved MB, [peak MB], rel err. A row that did not run shows its kind and ``note`` (the
    footnote mark)."""
    case = f"{r['op']} {r['shape']}" if r["shape"] != "-" else r["op"]
    head = ([r["op"], r["shape"]] if split else [case]) + [r["pass"]]
    head += ([r.get("precision") or "-"] if opt["precision"] else []) + [r["contender"] or "-"]
    width = 7 + opt["clips"] + opt["peak"]
    kind = _kind(r)
    if kind in ("error", "skipped") or r.get("ms") is None:
        return head + [f"{kind} {note}"] + [""] * (width - 2) + [_fmt(r.get("max_rel_err"), ".0e")]
    if kind == "noisy":
        speed = f"noisy {note}"
    else:
        speed = "base" if r["kind"] == "baseline" else _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else "")
    cells = head + [_fmt(r["ms"], ".2f"), _fmt(r["ms_iqr"], ".2f"), speed, _fmt(r["gflops"], ".0f")]
    cells += [_fmt(r["pct_roof"], ".0f")] + ([_fmt(r["clips_per_s"], ".1f")] if opt["clips"] else [])
    cells += [_fmt(r["saved_mb"], ".3g")] + ([_fmt(r["peak_mb"], ".1f")] if opt["peak"] else [])
    return cells + [_fmt(r.get("max_rel_err"), ".0e")]


def _header(opt: dict[str, bool], split: bool = False) -> list[str]:
    header = (["op", "shape"] if split else ["case"]) + ["pass"] + (["precision"] if opt["precision"] else [])
    header += ["contender", "ms", "IQR"]
    header += ["speed-up", "GFLOP/s", "% roof"] + (["clips/s"] if opt["clips"] else []) + ["saved MB"]
    return header + (["peak MB"] if opt["peak"] else []) + ["rel err"]


def _notes(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The footnote mark of every row ("" for clean rows) and the footnotes: the full status of each row that is
    not ok (error, skipped or noisy)."""
    marks, notes = [], []
    for r in rows:
        if r["status"] == "ok":
            marks.append("")
            continue
        case = f"{r['op']} {r['shape']}" if r["shape"] != "-" else r["op"]
        notes.append(f"[{len(notes) + 1}] {case} {r['pass']} {r['contender'] or ''}: {r['status']}")
        marks.append(f"[{len(notes)}]")
    return marks, notes


def _fit_lines(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The largest-batch rows (pass "fit") as cells: model and clip, contender, largest batch, vs eager."""
    eager = {r["shape"]: r.get("max_batch") for r in rows if r["contender"] == "eager"}
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["shape"], r["contender"], r["status"], ""])
            continue
        batch = f"{r['max_batch']}" + (" (search limit)" if r.get("max_batch_limited") else "")
        base = eager.get(r["shape"])
        ratio = "1 (base)" if r["contender"] == "eager" else (f"{r['max_batch'] / base:.1f}x" if base else "-")
        lines.append([r["shape"], r["contender"], batch, ratio])
    return lines


FIT_HEADER = ["model", "contender", "largest training batch that fits", "vs eager"]


def _split_fit(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [r for r in rows if r["pass"] != "fit"], [r for r in rows if r["pass"] == "fit"]


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The result as a Markdown table (for docs/benchmarks.md), headed by the machine and the command, with a
    footnote for every row that is not ok."""
    lines = []
    machine = (meta or {}).get("machine", {})
    if machine:
        where = machine.get("gpu") or machine.get("cpu")
        versions = f"torch {machine.get('torch')}"
        if machine.get("gpu"):
            versions += (
                f", CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}, driver {machine.get('driver')}, "
                f"Triton {machine.get('triton')}"
            )
        lines.append(
            f"Measured {machine.get('date_utc', '?')} on {where} ({machine.get('cpu_count')} cores), "
            f"{machine.get('threads')} thread(s), {versions}; load average before the run "
            f"{', '.join(f'{v:.1f}' for v in machine.get('load_avg') or [])}."
        )
    if meta and meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    if lines:
        lines.append("")
    rows, fit = _split_fit(rows)
    opt = _columns(rows)
    header = _header(opt, split=True)
    fixed = 5 if opt["precision"] else 4
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * fixed + "--:|" * (len(header) - fixed)]
    marks, notes = _notes(rows)
    for r, mark in zip(rows, marks, strict=True):
        speed_col = header.index("speed-up")
        cells = _cells(r, opt, mark, split=True)
        if r["status"] == "ok" and r["kind"] == "baseline":
            cells[speed_col] = "1 (base)"
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    if notes:
        lines += [""] + [note.replace("|", "/") + "  " for note in notes]
    if fit:
        lines += ["", "| " + " | ".join(FIT_HEADER) + " |", "|---|---|--:|--:|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in _fit_lines(fit)]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(rows, meta))
    return path


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The terminal table (rich; plain Markdown without it): one line per op and shape, pass and contender, the
    full status of every row that is not ok printed under the table."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(markdown_table(rows), end="")
        print(f"(rich is not installed: plain table; {MISSING_EXTRA} for the terminal table)")
        return
    console = console or Console()
    rows, fit = _split_fit(rows)
    opt = _columns(rows)
    table = Table(header_style="bold", pad_edge=False)
    for name in _header(opt):
        table.add_column(name, justify="left" if name in ("case", "pass", "precision", "contender") else "right")
    marks, notes = _notes(rows)
    previous = None
    for r, mark in zip(rows, marks, strict=True):
        key = (r["op"], r["shape"], r["pass"], r.get("precision"))
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        cells = [escape(c) for c in _cells(r, opt, mark)]
        if r["status"] != "ok":
            cells = [f"[yellow]{c}[/]" if mark in c else c for c in cells]
        table.add_row(*cells)
    console.print(table)
    for note in notes:
        console.print(note, style="yellow", markup=False, highlight=False)
    if fit:
        fit_table = Table(header_style="bold", pad_edge=False)
        for name in FIT_HEADER:
            fit_table.add_column(name, justify="left" if name in ("model", "contender") else "right")
        for cells in _fit_lines(fit):
            fit_table.add_row(*(escape(c) for c in cells))
        console.print(fit_table)


def kernel_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``--profile``: the top GPU kernels of each profiled row, as text lines."""
    lines = []
    for r in rows:
        if r.get("kernels"):
            lines.append(f"{r['op']} {r['shape']} {r['pass']} {r.get('precision')} {r['contender']}: top kernels")
            lines += [f"  {ms:9.3f} ms  x{calls:<4d} {name[:100]}" for name, ms, calls in r["kernels"]]
    return lines


def write_plot(path: Path, rows: list[dict[str, Any]], title: str = "") -> Path | None:
    """Bar chart of the speed-up vs the baseline per shape (x), one panel per pass, one bar per contender (and
    precision); without a published speed-up, a figure saying so. Returns None without rows or without matplotlib."""
    timed = [r for r in rows if r.get("speedup") is not None and r["kind"] != "baseline"]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({MISSING_EXTRA})")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not timed:  # a figure that says so, rather than a missing file
        fig = plt.figure(figsize=(6.0, 1.5))
        fig.text(0.5, 0.5, "no speed-up published: every row is noisy, failed or skipped (see the table)", ha="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    several = len({r.get("precision") for r in timed}) > 1
    label = lambda r: f"{r['contender']} {r['precision']}" if several else r["contender"]  # noqa: E731
    passes = [p for p in PASSES if any(r["pass"] == p for r in timed)]
    contenders = list(dict.fromkeys(label(r) for r in timed))
    shapes = list(dict.fromkeys(f"{r['op']}\n{r['shape']}" for r in timed))
    fig, axes = plt.subplots(
        len(passes),
        1,
        figsize=(max(6.0, 0.9 * len(shapes) * max(1, len(contenders)) * 0.45 + 2), 3.2 * len(passes)),
        squeeze=False,
    )
    width = 0.8 / max(1, len(contenders))
    for ax, pass_ in zip(axes[:, 0], passes, strict=True):
        for j, name in enumerate(contenders):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                for r in timed:
                    if r["pass"] == pass_ and label(r) == name and f"{r['op']}\n{r['shape']}" == shape:
                        xs.append(i + (j - (len(contenders) - 1) / 2) * width)
                        ys.append(r["speedup"])
            if xs:
                bars = ax.bar(xs, ys, width, label=name)
                ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), shapes, fontsize=6)
        ax.set_ylabel("speed-up vs eager")
        ax.set_title(f"{pass_}", fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the bar labels
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
