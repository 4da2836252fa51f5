"""The benchmark table writer: docs/performance.md keeps one section per benchmark."""

from __future__ import annotations

from pathlib import Path

from tests.bench.report import Table, write_section


def _table(value: float) -> Table:
    t = Table("decode", "Decode", "python -m tests.bench.bench_decode", ["syntax", "ms"])
    t.add("RLE", value)
    t.notes.append("a note")
    return t


def test_write_section_appends_then_replaces_only_its_own(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written before table\n")
    write_section(_table(43.25), doc)
    first = doc.read_text()
    assert first.startswith("# Performance\n\nhand-written before table\n")
    assert "### Decode" in first and "| RLE | 43.2 |" in first and "a note" in first
    other = Table("receive", "Receive", "cmd", ["x"])
    other.add(1)
    write_section(other, doc)
    write_section(_table(12.0), doc)
    text = doc.read_text()
    assert text.count("<!-- bench:decode -->") == 1 and text.count("### Decode") == 1
    assert "| RLE | 12.0 |" in text and "43.2" not in text
    assert "<!-- bench:receive -->" in text and "hand-written before table" in text


def test_table_text_and_markdown_carry_commit_and_machine() -> None:
    md = _table(1.5).markdown(when="2026-12-03 10:00 UTC")
    assert md.startswith("`python -m tests.bench.bench_decode` — 2026-12-03 10:00 UTC, commit ")
    assert "-core " in md.splitlines()[0]
    assert "| syntax | ms |" in md and "| RLE | 1.5 |" in md
    assert _table(1.5).text().splitlines()[0] == "Decode"
