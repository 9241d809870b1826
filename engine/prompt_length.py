"""Prompts longer than the model reads: refused with their token count, never cut.

SDXL's CLIP text encoders read a window of 77 tokens (start and end tokens included); diffusers
cuts anything longer with only a log line. The engine refuses such a prompt instead, naming the
Layout field, its token count and the window (``LimitError``, limit ``prompt_tokens``), so the
provenance of every image records exactly the text that conditioned it. (Concatenating 77-token
windows, as some front ends do, would change the regional attention's fixed block length.)
"""

from __future__ import annotations

from typing import Any

from engine.wire.layout import Layout, LimitError


def prompt_fields(layout: Layout) -> list[tuple[str, str]]:
    """Every prompt a Layout sends to the text encoders, with its field name."""
    fields = [("prompt", layout.prompt), ("negative_prompt", layout.negative_prompt)]
    if layout.background_prompt is not None:
        fields.append(("background_prompt", layout.background_prompt))
    fields += [(f"regions[{i}].prompt", r.prompt) for i, r in enumerate(layout.regions)]
    return fields


def check_prompt_tokens(pipe: Any, layout: Layout) -> None:
    """Raise LimitError (``prompt_tokens``) for the first prompt longer than the window of
    any of ``pipe``'s tokenizers, start and end tokens included; nothing is ever cut."""
    tokenizers = [getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2")]
    tokenizers = [t for t in tokenizers if t is not None]
    seen: set[str] = set()
    for field, text in prompt_fields(layout):
        if text in seen:
            continue
        seen.add(text)
        for tokenizer in tokenizers:
            window = min(int(tokenizer.model_max_length), 100_000)
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > window:
                raise LimitError(
                    f"'{field}' is {count} tokens long, start and end tokens included; the "
                    f"model reads at most {window}, and the rest would be silently cut. "
                    "Shorten it: describe the scene briefly and put each object's details in "
                    "its region's prompt",
                    field,
                    "prompt_tokens",
                    window,
                )
