"""The annotation pool: an LLM judge rates every segment of a response on every aspect.

Pure library (no Ray): prompts and their versioned templates, the reply parser, a
bounded and budgeted OpenAI client, the SQLite answer cache, token-bucket rate limits,
prices, the pool that ties them together, and the local rule-based judge server.
``actors/annotator.py`` wraps the pool for Ray; ``twodrl annotate`` runs it on files.
"""

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "JudgeCache": "cache",
    "cache_key": "cache",
    "Budget": "client",
    "BudgetExhausted": "client",
    "ChatClient": "client",
    "FatalJudgeError": "client",
    "JudgeError": "client",
    "redact": "client",
    "resolve_api_key": "client",
    "ParseError": "parser",
    "ParsedReply": "parser",
    "format_reply": "parser",
    "parse_reply": "parser",
    "AnnotationPool": "pool",
    "ItemResult": "pool",
    "JudgeItem": "pool",
    "JudgeTemplates": "prompts",
    "build_messages": "prompts",
    "load_templates": "prompts",
    "parse_request": "prompts",
    "repair_messages": "prompts",
    "start_judge_server": "judge_server",
    "JudgeServer": "judge_server",
    "Faults": "judge_server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: importing the light modules (cache, ratelimit) must not pull in torch or
    # the openai SDK, e.g. in every process that shares the answer cache.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"twodrl.annotation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'twodrl.annotation' has no attribute {name!r}")
