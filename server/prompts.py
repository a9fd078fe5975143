"""Prompts: k real examples of one intent as training lines, then `intent,` to continue."""

from __future__ import annotations

from typing import Any

import numpy as np

from condgen.codec import prompt_text


def build_prompt(
    intent: str, texts: list[str], k: int, rng: np.random.Generator, separator: str, shuffle: bool = False
) -> tuple[str, list[str]]:
    """`intent,text\\n` for k examples drawn without replacement, then the open line `intent,`.

    Returns the prompt and the example texts it shows.

    Examples keep their order in the bundle, so an intent with at most k examples always
    gets the same prompt and its prefill can be reused from the prefix cache. With `shuffle`
    (examples a request brought) they come in the drawn order instead: every round of an
    intent with at most k examples shows all of them, each round in another seeded order.
    """
    chosen: Any = rng.choice(len(texts), size=min(k, len(texts)), replace=False) if texts and k else []
    chosen = chosen if shuffle else np.sort(chosen)
    shown = [texts[int(i)] for i in chosen]
    return prompt_text(intent, shown, separator), shown
