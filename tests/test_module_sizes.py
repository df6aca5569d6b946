"""Modules stay small enough to read in one sitting, or say at their top why they are not."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT = 420  # "about 400 lines"
REASON = "# Over 400 lines: "


def _has_reason(lines: list[str]) -> bool:
    """The reason is a comment among the first lines after the module docstring."""
    return any(line.startswith(REASON) and len(line) > len(REASON) + 10 for line in lines[:80])


def test_every_long_module_says_why() -> None:
    long_and_silent = sorted(
        f"{path.relative_to(REPO)} ({n} lines)"
        for path in (REPO / "vajra").rglob("*.py")
        if (n := len(lines := path.read_text().splitlines())) > LIMIT and not _has_reason(lines)
    )
    assert long_and_silent == [], f"split these or add '{REASON}<why>' at their top"
