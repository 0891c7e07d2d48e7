"""Price table for the judge budget (USD per million tokens, input / output).

Prices are the public list prices of the providers at the time of writing; they change,
so a config can override them (``annotator.price_input_per_mtok`` /
``annotator.price_output_per_mtok``). A model missing from the table with a cost budget
set is a configuration error: a budget that silently counts $0 is no budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# model name (prefix match on the longest key) -> (input $/1M tokens, output $/1M tokens)
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o4-mini": (1.10, 4.40),
    "o3-mini": (1.10, 4.40),
    # Self-hosted / local judges cost nothing per token.
    "twodrl-synthetic-judge": (0.0, 0.0),
}


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def price_for(
    model: str,
    input_per_mtok: Optional[float] = None,
    output_per_mtok: Optional[float] = None,
) -> Optional[Price]:
    """The price of ``model`` (overrides win), or None when unknown."""
    if input_per_mtok is not None or output_per_mtok is not None:
        return Price(float(input_per_mtok or 0.0), float(output_per_mtok or 0.0))
    # Longest prefix first: "gpt-4o-mini-2024-07-18" must match gpt-4o-mini, not gpt-4o.
    for key in sorted(PRICES_PER_MTOK, key=len, reverse=True):
        if model == key or model.startswith(key + "-") or model.startswith(key + ":"):
            return Price(*PRICES_PER_MTOK[key])
    return None
