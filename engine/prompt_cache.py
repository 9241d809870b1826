"""Encoded prompts kept across calls of one pipeline, so identical requests skip the text encoders.

A Layout with a hundred objects encodes a hundred prompts; the next request for the same scene
(another seed, a moved object) usually encodes the same texts again. :class:`PromptCache` keeps
each text's embedding and pooled embedding, keyed by the text and by everything else that
changes the result (the LoRA scale, clip skip, which encoder variant), bounded by bytes with the
least recently used dropped first. It lives on the pipeline, so loading another model starts
afresh, and it clears itself when the pipeline's text encoders are swapped, converted,
changed in place (LoRA weights loaded into them) or given other active adapters
(:func:`encoder_identity`), or when the execution device changes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

PROMPT_CACHE_BYTES = 256 * 2**20
"""Bytes of encoded prompts kept per pipeline: SDXL's 77 x 2048 embedding and pooled vector
take 0.3 MiB in half precision, so about 800 prompts."""

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
"""Encodes texts as one batch: embeddings ``(texts, tokens, dim)`` and pooled ``(texts, dim)``."""


class PromptCache:
    """Per-text encoded prompts, least recently used dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = PROMPT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._owner: Any = None
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def encode(
        self, texts: Sequence[str], variant: Hashable, owner: Any, encoder: Encoder
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(len(texts), tokens, dim)`` and pooled ``(len(texts), dim)`` of
        ``texts``, encoding only those not kept for ``variant``.

        ``owner`` identifies the encoders (their identity, device and dtype): when it differs
        from the last call's, everything kept is dropped first. ``encoder`` gets the missing
        texts, each once, as one batch.
        """
        with self._lock:
            if owner != self._owner:
                self._clear()
                self._owner = owner
            missing = [t for t in dict.fromkeys(texts) if (variant, t) not in self._entries]
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            encoded, pooled = encoder(missing)
            for i, text in enumerate(missing):
                # Copies, so one kept row does not hold the whole batch's memory.
                found[text] = (encoded[i].clone(), pooled[i].clone())
        with self._lock:
            for text, entry in found.items():
                self._store((variant, text), entry)
            for text in texts:
                if text not in found:
                    key = (variant, text)
                    if key in self._entries:
                        self._entries.move_to_end(key)
                        found[text] = self._entries[key]
        if len(found) < len(set(texts)):
            # Dropped between the two looks (another thread filled the cache): encode again.
            rest = [t for t in dict.fromkeys(texts) if t not in found]
            encoded, pooled = encoder(rest)
            found.update({t: (encoded[i], pooled[i]) for i, t in enumerate(rest)})
        return (
            torch.stack([found[t][0] for t in texts]),
            torch.stack([found[t][1] for t in texts]),
        )

    def _store(self, key: Hashable, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in dropped)

    @property
    def bytes(self) -> int:
        """Bytes of the prompts kept now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every kept prompt."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def encoder_identity(*modules: torch.nn.Module | None) -> tuple:
    """What :meth:`PromptCache.encode` compares as ``owner`` for these text encoders: each one's
    identity, dtype, parameter count and the sum of its parameters' version counters (which
    in-place weight changes such as loading LoRA weights raise), and its active adapters."""
    parts: list[Any] = []
    for module in modules:
        if module is None:
            parts.append(None)
            continue
        parameters = list(module.parameters())
        adapters = getattr(module, "active_adapters", None)
        try:
            active = tuple(adapters()) if callable(adapters) else None
        except (ValueError, AttributeError):  # peft raises when no adapter is loaded
            active = None
        parts.append(
            (
                id(module),
                parameters[0].dtype if parameters else None,
                len(parameters),
                sum(p._version for p in parameters),
                active,
            )
        )
    return tuple(parts)
