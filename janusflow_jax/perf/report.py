"""What every benchmark report shares, written once: its provenance (`meta`: device, date, commit, command, load),
number formatting, its JSON file and its markdown copy in an output directory (`save`), and the marked section of a
markdown file that a report type owns (`replace_section`, e.g. BENCHMARKS.md's bench and race sections).

A report is a plain dict {"mode": ..., "meta": meta(...), <the measurements>}; each benchmark formats its own tables
(`bench.format_report`, `race_report.format_report`) and renders its own section from a directory of JSON reports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import jax
from etils import epath


def progress(message: str):
    """One line on stderr as each measurement lands (a run cut short still shows what it measured)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta(label: str, command: str, note: str = "") -> dict:
    """Where and when a report was measured; `finish` adds the load average at its end."""
    d = jax.devices()[0]
    return {"device": f"{jax.device_count()} x {d.platform}:{d.device_kind}", "platform": d.platform,
            "device_kind": d.device_kind, "num_devices": jax.device_count(), "host": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
            "command": command, "config": label, "load_average_start": load_average(), "jax": jax.__version__,
            "note": note}


def finish(report: dict) -> dict:
    report["meta"]["load_average_end"] = load_average()
    return report


def num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def header(report: dict, title: str, shared_host: bool = False) -> list[str]:
    """A report's first lines: its title, device, commit, load and command (and the note when there is one)."""
    m = report["meta"]
    lines = [title, "", f"device {m['device']} ({m['cpu_count']} host cores{', shared with other jobs' * shared_host});"
             f" commit {m['commit']}; load average {m['load_average_start']} before, "
             f"{m.get('load_average_end', 'n/a')} after; jax {m['jax']}", f"command: `{m['command']}`", ""]
    if m.get("note"):
        lines += [f"Note: {m['note']}", ""]
    return lines


def stem(report: dict) -> str:
    """`<mode>_<config slug>_<UTC stamp>`: the names sort by time within a (mode, config)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    label = report["meta"]["config"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    if len(slug) > 48:  # long override lists: a prefix plus a digest keeps names short and distinct
        slug = slug[:40] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return f"{report['mode']}_{slug}_{stamp}"


def save_json(report: dict, json_dir, name: str | None = None) -> epath.Path:
    json_dir = epath.Path(json_dir)  # local or gs://
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / f"{name or stem(report)}.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    return path


def save(report: dict, text: str, out_dir) -> tuple[epath.Path, epath.Path]:
    """The report's JSON and its markdown tables (`text`), side by side in `out_dir` under one name."""
    name = stem(report)
    json_path = save_json(report, out_dir, name)
    md_path = epath.Path(out_dir) / f"{name}.md"
    md_path.write_text(text + "\n")
    return json_path, md_path


def replace_section(md_path, begin: str, end: str, section: str) -> None:
    """Replaces only the text between the markers `begin` and `end` in `md_path` with `section` (appends the marked
    section if absent; creates the file if needed). Re-reads the file right before writing: another section of the
    file has another author."""
    md_path = epath.Path(md_path)
    body = f"{begin}\n{section}\n{end}"
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        new = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        new = text.rstrip("\n") + "\n\n" + body + "\n"
    md_path.write_text(new)
