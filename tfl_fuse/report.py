"""How report entries read in words: one format for rewrites and refusals, on stderr and in JSON.

A rewrite and a refusal both carry ``rule``, ``subgraph`` and ``ops`` (``TYPE:name`` labels,
named by the op's output tensor in the input model); a rewrite adds ``detail``, a refusal
``reason``.
"""

from __future__ import annotations

from typing import Any


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 rewrite``, ``2 rewrites``."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def entry_text(entry: dict[str, Any]) -> str:
    """``[rule] MUL:m + ADD:a: what happened`` (with ``subgraph N:`` outside subgraph 0)."""
    where = " + ".join(entry.get("ops") or []) or "the whole subgraph"
    if entry.get("subgraph", 0):
        where = f"subgraph {entry['subgraph']}: {where}"
    said = entry.get("detail", entry.get("reason", ""))
    return f"[{entry['rule']}] {where}: {said}"
