"""Data preparation and training recipes for the encdec toolkit (one sub-package per task).

Recipes write plain parallel text: ``{split}.src`` and ``{split}.tgt``, UTF-8,
one example per line, line ``i`` of one file aligned with line ``i`` of the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def write_parallel(
    out_dir: str | Path, split: str, sources: Sequence[str], targets: Sequence[str]
) -> None:
    """Write ``out_dir/{split}.src`` and ``out_dir/{split}.tgt`` (created if missing)."""
    if len(sources) != len(targets):
        raise ValueError(f"{split}: {len(sources)} sources but {len(targets)} targets")
    for side, lines in (("src", sources), ("tgt", targets)):
        if any("\n" in line for line in lines):
            # A newline inside an example would silently misalign the two files.
            raise ValueError(f"{split}.{side}: an example contains a newline")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for side, lines in (("src", sources), ("tgt", targets)):
        text = "".join(f"{line}\n" for line in lines)
        (out / f"{split}.{side}").write_text(text, encoding="utf-8")
