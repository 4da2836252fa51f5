"""One table format for every benchmark, and the writer that puts it into docs/performance.md.

Each benchmark module has ``run(args) -> Table`` and ``add_arguments(parser)``; ``python -m
tests.bench`` runs them in turn and, with ``--write``, replaces the section between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in docs/performance.md with the new table
(date, machine and commit above it). Figures from earlier runs stay in the hand-written tables
around those sections (the "before" of a change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PERFORMANCE_MD = REPO / "docs" / "performance.md"


def machine() -> str:
    """CPU model, cores and memory of this machine, in words."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()}-core {model}{mem}, {platform.system()} {platform.machine()}"


def commit() -> str:
    """Short commit of the checkout, with ``+`` when the working tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


@dataclass
class Table:
    """A benchmark's result: a markdown table plus the lines that say how to read it."""

    name: str  # the section marker in docs/performance.md
    title: str
    command: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    appendix: str = ""  # printed after the table (a profile), not written to the docs

    def add(self, *cells: object) -> None:
        self.rows.append([_cell(c) for c in cells])

    def markdown(self, when: str | None = None) -> str:
        stamp = when or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"`{self.command}` — {stamp}, commit {commit()}, {machine()}.", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines)

    def text(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        out = [self.title]
        out.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)))
        for r in self.rows:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        out += self.notes
        if self.appendix:
            out += ["", self.appendix]
        return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def write_section(table: Table, path: Path = PERFORMANCE_MD) -> None:
    """Replace (or append) the marked section of ``table.name`` in ``path``."""
    begin, end = f"<!-- bench:{table.name} -->", f"<!-- /bench:{table.name} -->"
    body = f"{begin}\n{table.markdown()}\n{end}"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: body, text)
    else:
        text = text.rstrip("\n") + f"\n\n### {table.title}\n\n{body}\n"
    path.write_text(text)


def main(doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
         run: Callable[[argparse.Namespace], Table]) -> None:
    """One benchmark module run alone: its options (``--help`` from its docstring), then its
    table printed."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(p)
    print(run(p.parse_args()).text())
