"""A run's world, behind one interface: which prompts it trains and evaluates on, and
what (if anything) it offers for the round-0 warm start, the first reward model and
DPA's replay.

The driver only talks to :class:`Task`; which task a run uses is data
(``task.name`` in the config), never a code path of the driver:

* ``synthetic`` — the embedded animal task of :mod:`twodrl.synthetic`, the quickstart's
  default. It builds its own warm-start responses and is rated by the local rule-based
  judge in ``synthetic`` mode.
* ``dataset`` — a team's own prompts: a JSONL / Parquet file, a saved ``datasets``
  directory or a hub name. Each row is a plain prompt (``task.prompt_field``), a chat in
  the conversational ``messages`` layout (``task.messages_field``: a leading system turn
  is the system prompt, the last user turn is the prompt, the turns between are its
  history) or a HelpSteer-2D pair record (its ``prompt`` and ``history``). Warm-start
  and replay data come from ``task.sft_dataset`` when given; otherwise the policy is
  taken to be an instruct model already.

Everything here is pure: no Ray, no model. The one model-dependent step, dropping
prompts too long for the policy's context, takes a token-counting function.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from twodrl.data import ROLES, DataError, _iter_rows

Message = dict  # {"role": str, "content": str}


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt: a stable ``id``, the user ``text``, earlier turns and an optional
    system prompt. ``meta`` holds what a task needs to know about its own prompts (the
    synthetic task's topic)."""

    id: str
    text: str
    history: tuple[Message, ...] = ()
    system: Optional[str] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def request(self) -> dict:
        """The fields of a rollout request (the rollout worker renders them with the
        policy's chat template)."""
        req: dict[str, Any] = {"prompt": self.text}
        if self.history:
            req["history"] = [dict(m) for m in self.history]
        if self.system:
            req["system"] = self.system
        return req


def normalise(text: str) -> str:
    """The key two prompts are the same under: case and whitespace do not count."""
    return re.sub(r"\s+", " ", text).strip().lower()


def prompt_key(p: TaskPrompt) -> str:
    turns = [normalise(m["content"]) for m in p.history]
    return "\x1f".join(turns + [normalise(p.text)])


class Task:
    """What a run needs from its world. Subclasses fill ``train`` / ``eval`` and may
    override the three data hooks."""

    name: str = "task"
    #: the local judge server's mode that rates this task's responses, when the run
    #: names no judge endpoint; None: the task needs ``annotator.base_url``.
    local_judge: Optional[str] = None

    def __init__(self, train: list[TaskPrompt], eval_prompts: list[TaskPrompt], stats: Optional[dict] = None):
        self.train = train
        self.eval = eval_prompts
        self.stats: dict[str, float] = dict(stats or {})

    # Round 0 ---------------------------------------------------------------

    def warm_start_examples(self, n: int) -> list[dict]:
        """Up to ``n`` SFT examples ``{"prompt", "response", "history"?, "system"?}``;
        empty when the task has none (an instruct policy needs no warm start)."""
        return []

    def rm_training_responses(self, n: int) -> Optional[list[dict]]:
        """Responses for the first reward model's judge annotations, or None: rate the
        policy's own responses to train prompts."""
        return None

    def replay_example(self, rng: random.Random) -> Optional[dict]:
        """One example of the task's original data for DPA's replay; None: no replay."""
        return None

    @property
    def has_replay(self) -> bool:
        return False

    # Filtering -------------------------------------------------------------

    def drop_too_long(self, count_tokens: Callable[[TaskPrompt], int], limit: int) -> int:
        """Drop prompts whose chat-templated length exceeds ``limit`` tokens (the
        policy's context minus the tokens to generate); returns how many went. Never
        cut: a cut prompt is another prompt."""
        dropped = 0
        for name in ("train", "eval"):
            kept = [p for p in getattr(self, name) if count_tokens(p) <= limit]
            dropped += len(getattr(self, name)) - len(kept)
            setattr(self, name, kept)
        self.stats["task/dropped_too_long"] = self.stats.get("task/dropped_too_long", 0) + dropped
        if not self.train:
            raise DataError(f"task {self.name}: every train prompt is longer than {limit} tokens "
                            "(policy.max_length − max_new_tokens)")
        return dropped

    def describe(self) -> str:
        extra = ", ".join(f"{k.split('/')[-1]}={v:g}" for k, v in self.stats.items() if v)
        return f"task {self.name}: {len(self.train)} train / {len(self.eval)} eval prompts" + (f" ({extra})" if extra else "")


# ----------------------------------------------------------------------------- synthetic


class SyntheticTask(Task):
    """The embedded animal task (see :mod:`twodrl.synthetic`)."""

    name = "synthetic"
    local_judge = "synthetic"

    def __init__(self, seed: int = 0, train_cap: Optional[int] = None):
        from twodrl import synthetic

        train, held = synthetic.split_prompts(seed)
        to_prompt = lambda tag: lambda i_p: TaskPrompt(f"{tag}-{i_p[0]}", i_p[1].text, meta={"topic": i_p[1].topic})  # noqa: E731
        train_prompts = list(map(to_prompt("syn"), enumerate(train)))
        super().__init__(train_prompts[:train_cap] if train_cap else train_prompts,
                         list(map(to_prompt("syn-eval"), enumerate(held))))
        self._seed = seed

    def warm_start_examples(self, n: int) -> list[dict]:
        """Mixed-quality responses (one seeded stream, so a shorter list is a prefix of
        a longer one)."""
        from twodrl import synthetic

        rng = random.Random(self._seed)
        out = []
        for i in range(n):
            p = self.train[i % len(self.train)]
            out.append({"prompt": p.text, "response": synthetic.sample_response(rng, p.meta["topic"])})
        return out

    def rm_training_responses(self, n: int) -> Optional[list[dict]]:
        return self.warm_start_examples(n)

    def replay_example(self, rng: random.Random) -> Optional[dict]:
        from twodrl import synthetic

        p = rng.choice(self.train)
        return {"prompt": p.text, "response": synthetic.sample_response(rng, p.meta["topic"])}

    @property
    def has_replay(self) -> bool:
        return True


# ------------------------------------------------------------------------------- dataset


def _turns(value: Any, field_name: str, where: str) -> list[Message]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {field_name} is a string that is not JSON chat turns") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field_name}: expected a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field_name}[{i}]: expected an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {field_name}[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field_name}[{i}].content: expected a string, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    return turns


def _split_system(turns: list[Message]) -> tuple[Optional[str], list[Message]]:
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return None, turns


def parse_prompt_row(row: Any, where: str, prompt_field: str = "prompt", messages_field: str = "messages",
                     source: str = "") -> tuple[str, Optional[str], list[Message]]:
    """``(text, system, history)`` of one prompt row; :class:`DataError` naming the
    place and the fields looked for when the row has neither layout."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    value = row.get(prompt_field)
    if isinstance(value, str) and value.strip():
        history = _turns(row["history"], "history", where) if row.get("history") else []
        system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else None
        return value, system, history
    if row.get(messages_field) is not None:
        system, turns = _split_system(_turns(row[messages_field], messages_field, where))
        if not turns or turns[-1]["role"] != "user":
            raise DataError(f"{where}: {messages_field}: the last turn must be the user's prompt "
                            f"(got {turns[-1]['role'] if turns else 'only a system turn'})")
        return turns[-1]["content"], system, turns[:-1]
    if value is not None:
        raise DataError(f"{where}: {prompt_field}: expected a non-empty string, got {value!r}")
    raise DataError(
        f"{where}: neither a {prompt_field!r} field (task.prompt_field) nor a {messages_field!r} field "
        f"(task.messages_field) in this row; its fields are {sorted(map(str, row))}"
    )


def parse_sft_row(row: Any, where: str, prompt_field: str = "prompt", messages_field: str = "messages",
                  response_field: str = "response") -> dict:
    """One warm-start example: ``messages`` ending with the assistant's answer, or a
    prompt and a ``response`` string."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if row.get(messages_field) is not None:
        system, turns = _split_system(_turns(row[messages_field], messages_field, where))
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
            raise DataError(f"{where}: {messages_field}: an SFT example must end with a user turn and the "
                            "assistant's answer")
        ex = {"prompt": turns[-2]["content"], "response": turns[-1]["content"]}
        history, ex_system = turns[:-2], system
    else:
        response = row.get(response_field)
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: an SFT example needs {messages_field!r} turns or a {prompt_field!r} "
                            f"and a {response_field!r} string; its fields are {sorted(map(str, row))}")
        prompt, ex_system, history = parse_prompt_row(row, where, prompt_field, messages_field)
        ex = {"prompt": prompt, "response": response}
    if history:
        ex["history"] = history
    if ex_system:
        ex["system"] = ex_system
    return ex


def load_prompts(source: str, split: str = "train", prompt_field: str = "prompt",
                 messages_field: str = "messages", id_prefix: str = "p", limit: Optional[int] = None,
                 progress: bool = False) -> list[TaskPrompt]:
    """Every prompt of a dataset, in file order. A row's ``id`` field (string or int)
    names it; else ``<id_prefix>-<row>``. The first bad row raises :class:`DataError`
    with its file and line (or row) — a dataset is never half read silently."""
    rows, total = _iter_rows(source, split)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, total=total, desc=f"prompts {source}", unit="row")
    out: list[TaskPrompt] = []
    seen_ids: set[str] = set()
    for n, (where, row) in enumerate(rows):
        if isinstance(row, DataError):
            raise row
        text, system, history = parse_prompt_row(row, where, prompt_field, messages_field, source)
        rid = row.get("id") if isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool) else None
        pid = str(rid) if rid is not None else f"{id_prefix}-{n}"
        if pid in seen_ids:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen_ids.add(pid)
        out.append(TaskPrompt(pid, text, tuple(history), system))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no prompts")
    return out


def load_sft_examples(source: str, split: str = "train", prompt_field: str = "prompt",
                      messages_field: str = "messages", limit: Optional[int] = None) -> list[dict]:
    rows, _ = _iter_rows(source, split)
    out = []
    for where, row in rows:
        if isinstance(row, DataError):
            raise row
        out.append(parse_sft_row(row, where, prompt_field, messages_field))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: no SFT examples")
    return out


def held_out_split(prompts: Sequence[TaskPrompt], n_eval: int, seed: int) -> tuple[list[TaskPrompt], list[TaskPrompt]]:
    """A seeded held-out set of ``n_eval`` distinct prompts and the train pool without
    any prompt equal to one of them (case and whitespace aside): a duplicate of an eval
    prompt in the train file would otherwise leak it."""
    keys: dict[str, int] = {}
    for p in prompts:
        keys.setdefault(prompt_key(p), len(keys))
    order = sorted(keys, key=keys.get)
    random.Random(f"eval-split:{seed}").shuffle(order)
    n_eval = min(n_eval, max(0, len(order) - 1))  # leave at least one prompt to train on
    held = set(order[:n_eval])
    eval_prompts, seen = [], set()
    for p in prompts:
        k = prompt_key(p)
        if k in held and k not in seen:
            eval_prompts.append(p)
            seen.add(k)
    return [p for p in prompts if prompt_key(p) not in held], eval_prompts


class DatasetTask(Task):
    """Prompts from a team's dataset (see the module docstring)."""

    name = "dataset"
    local_judge = None

    def __init__(self, train: list[TaskPrompt], eval_prompts: list[TaskPrompt],
                 sft_examples: Optional[list[dict]] = None, stats: Optional[dict] = None):
        super().__init__(train, eval_prompts, stats)
        self._sft = list(sft_examples or [])

    def warm_start_examples(self, n: int) -> list[dict]:
        return self._sft[:n]

    def replay_example(self, rng: random.Random) -> Optional[dict]:
        return rng.choice(self._sft) if self._sft else None

    @property
    def has_replay(self) -> bool:
        return bool(self._sft)


def dataset_task(task_cfg: Any, seed: int, progress: bool = False) -> DatasetTask:
    """Build a :class:`DatasetTask` from a ``TaskConfig``."""
    t = task_cfg
    if not t.dataset:
        raise DataError("task.name is 'dataset' but task.dataset names no prompt dataset")
    prompts = load_prompts(t.dataset, t.split, t.prompt_field, t.messages_field, "train", progress=progress)
    # Datasets with several responses per prompt (HelpSteer2, UltraFeedback) repeat
    # their prompts: the pool holds each once, so an epoch asks it once.
    unique, seen = [], set()
    for p in prompts:
        if prompt_key(p) not in seen:
            seen.add(prompt_key(p))
            unique.append(p)
    stats: dict[str, float] = {"task/dropped_duplicates": len(prompts) - len(unique)}
    prompts = unique
    if t.eval_dataset:
        eval_prompts = load_prompts(t.eval_dataset, t.eval_split, t.prompt_field, t.messages_field, "eval",
                                    progress=progress)
        eval_keys = {prompt_key(p) for p in eval_prompts}
        train = [p for p in prompts if prompt_key(p) not in eval_keys]
        stats["task/dropped_overlap"] = len(prompts) - len(train)
        if not train:
            raise DataError(f"{t.dataset}: every train prompt is also in task.eval_dataset {t.eval_dataset}")
    else:
        train, eval_prompts = held_out_split(prompts, t.eval_prompts, seed)
    if t.train_prompts is not None:
        train = train[: t.train_prompts]
    sft = load_sft_examples(t.sft_dataset, t.sft_split, t.prompt_field, t.messages_field) if t.sft_dataset else None
    return DatasetTask(train, eval_prompts, sft, stats)


def build_task(cfg: Any, progress: bool = False) -> Task:
    """The task a ``RunConfig`` names."""
    if cfg.task.name == "synthetic":
        return SyntheticTask(cfg.seed, cfg.task.train_prompts)
    if cfg.task.name == "dataset":
        return dataset_task(cfg.task, cfg.seed, progress=progress)
    raise ValueError(f"task.name: unknown task {cfg.task.name!r}; known: synthetic, dataset")


def prepare_task(cfg: Any, tokenizer: Any = None, progress: bool = False) -> Task:
    """The run's task with the prompts its policy cannot take dropped and counted: the
    chat-templated prompt plus the longest generation must fit ``policy.max_length``."""
    task = build_task(cfg, progress=progress)
    if tokenizer is None:
        from twodrl.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.policy)
    limit = cfg.policy.max_length - max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    dropped = task.drop_too_long(prompt_token_counter(tokenizer, cfg.rollout.system_prompt), limit)
    if dropped:
        print(f"[twodrl] dropped {dropped} prompt(s) longer than {limit} tokens "
              f"(policy.max_length {cfg.policy.max_length} − max_new_tokens); none was cut", flush=True)
    return task


def prompt_token_counter(tokenizer, default_system: Optional[str] = None) -> Callable[[TaskPrompt], int]:
    """Tokens of a prompt as the rollout worker will render it (chat template, system
    prompt, history)."""
    from twodrl.models.logprobs import render_prompt

    def count(p: TaskPrompt) -> int:
        text = render_prompt(tokenizer, p.text, history=list(p.history), system=p.system or default_system)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


__all__: Iterable[str] = (
    "Task", "TaskPrompt", "SyntheticTask", "DatasetTask", "build_task", "dataset_task", "load_prompts",
    "load_sft_examples", "held_out_split", "parse_prompt_row", "parse_sft_row", "normalise", "prepare_task",
    "prompt_token_counter",
)
