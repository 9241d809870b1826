"""Prompt text edits shared by both sides: cutting region phrases out of a scene prompt."""

from __future__ import annotations

import re


def strip_phrases(prompt: str, phrases: list[str]) -> str:
    """Remove each phrase (case-insensitive, whole words) from a prompt and tidy the joins.

    ``"a red circle and a blue square on grey"`` minus ``["a red circle", "a blue square"]``
    gives ``"on grey"``: a list item that becomes empty goes together with its separator
    (comma, semicolon, "and", "with").
    """
    text = prompt
    for phrase in sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True):
        text = re.sub(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", "\0", text, flags=re.IGNORECASE)
    parts = re.split(r"(\s*(?:[,;&]|\band\b|\bwith\b)\s*)", text)
    pieces, seps = parts[0::2], parts[1::2]
    kept: list[str] = []
    for i, piece in enumerate(pieces):
        if not piece.replace("\0", "").strip():
            continue
        if kept:
            kept.append(seps[i - 1])
        kept.append(piece.replace("\0", " "))
    return re.sub(r"\s+", " ", "".join(kept)).strip(" ,;")
