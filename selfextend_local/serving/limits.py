"""What one request may ask of the server; ``serve``'s options take their defaults from here (a module of
its own, so ``serve --help`` does not load the server)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    queue_size: int = 8  # requests that may wait for a slot; one more gets 429
    max_body_bytes: int = 8 << 20
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    prompt_cache_bytes: int = 512 << 20  # host memory for the prompts of slots that move on (0: none)
