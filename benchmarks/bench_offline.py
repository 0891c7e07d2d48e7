"""Offline DPO throughput: twodrl's training step vs TRL's ``DPOTrainer``.

Both train the same tiny offline policy (``tiny:policy``, float32, CPU, one process)
on the same 256 synthetic preference pairs (plain-string prompt/chosen/rejected, one
segment each), with the same batch size, max length, number of optimizer steps, AdamW
and learning rate, and DPO's sigmoid loss with β = 0.1 and no SFT term.

- twodrl: what every learner rank runs (``twodrl.objectives``: collation through the
  shared log-prob encoder, chunked token log-probs, ``compute_preference_loss``) with
  the reference log-probs computed once beforehand, as ``twodrl train`` does with
  ``train.precompute_reference`` (its default). The reference pass is counted in the
  time. DeepSpeed and Ray are left out: they add nothing in one process.
- TRL: ``DPOTrainer`` with its defaults (reference forward on every step).

The default 64 steps are two epochs of the 256 pairs at batch 8: twodrl pays the
reference pass once, TRL's default pays it every step. With ``--steps 32`` (one epoch)
both run the reference once per pair and the gap is what is left of the step itself.

The reference model is the policy with small seeded noise added to its weights, so the
first step's loss is not the trivial ln 2 of policy = reference: the two first-step
losses on the same batch agree only when both frameworks tokenize the pairs the same
way and compute the same log-probs.

    python benchmarks/bench_offline.py [--json PATH] [--steps 64] [--batch-size 8] [--repeats 3] [--threads 1]

Prints tokens/s of each (tokens of the chosen and rejected sequences trained on), the
ratio, peak resident memory of each (measured in a fresh process per framework), and
the largest |Δ loss| of the first step. JSON keys: ``twodrl_tokens_per_s``,
``trl_tokens_per_s``, ``speedup``, ``first_step_loss_diff`` (plus the peaks and the
settings). Needs ``trl`` (``pip install -e .[bench]``); exits 0 with a note if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._setup import prepare_environment  # noqa: E402

prepare_environment()

BETA = 0.1
LR = 5e-5


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    from twodrl.synthetic import make_preference_records

    return [{"prompt": r["prompt"], "chosen": r["chosen"]["text"], "rejected": r["rejected"]["text"]}
            for r in make_preference_records(n, seed=seed)]


def one_segment(pair: dict) -> dict:
    """The twodrl record of a plain pair (what ``twodrl convert --from preference`` writes)."""
    from twodrl.convert import parse_preference_row

    return parse_preference_row(pair).to_json()


def build_models(workdir: Path):
    """(policy directory, reference directory): the tiny policy and a perturbed copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twodrl.models.tiny import tiny_model_path

    src = tiny_model_path("policy")
    ref_dir = workdir / "reference"
    if not (ref_dir / "model.safetensors").exists():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        ref.save_pretrained(ref_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(ref_dir)
    return src, ref_dir


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- twodrl


def run_twodrl(pairs: list[dict], policy_dir, ref_dir, steps: int, batch: int, max_length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twodrl import objectives
    from twodrl.config import LearnerConfig
    from twodrl.offline import fill_reference

    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "right"
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    records = [one_segment(p) for p in pairs]
    lc = LearnerConfig(beta=BETA, sft_coef=0.0, lr=LR)
    aspects = ["helpfulness"]
    batches = [list(range(i * batch, (i + 1) * batch)) for i in range(steps)]
    batches = [[j % len(records) for j in b] for b in batches]
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)

    t0 = time.perf_counter()
    # The reference pass, once over every pair used (train.precompute_reference).
    cache: dict[int, tuple] = {}
    with torch.no_grad():
        needed = sorted({j for b in batches for j in b})
        for i in range(0, len(needed), batch):
            idx = needed[i:i + batch]
            enc = objectives.collate_pairs(tok, [records[j] for j in idx], aspects, max_length)
            rows = objectives.unpad_response(objectives.forward_token_logps(ref, enc)[0], enc.response_mask)
            for k, j in enumerate(idx):
                cache[j] = (rows[k], rows[len(idx) + k])
    tokens, losses = 0, []
    for b in batches:
        enc = objectives.collate_pairs(tok, [records[j] for j in b], aspects, max_length)
        ref_lp = fill_reference(enc.response_mask, enc.num_pairs, [cache[j] for j in b])
        lp, _ = objectives.forward_token_logps(policy, enc)
        loss, _ = objectives.compute_preference_loss("dpo", {"token_logps": lp, "logits": None},
                                                     {"token_logps": ref_lp}, enc, lc, [1.0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        tokens += int(enc.attention_mask.sum())
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "first_loss": losses[0],
            "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- TRL


def run_trl(pairs: list[dict], policy_dir, ref_dir, steps: int, batch: int, max_length: int, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    # The same token sequences twodrl trains on: the chat-templated prompt as text, and
    # each response closed by the end-of-turn token (TRL's conversational path would
    # also train on the template's newline after it, one token more per response).
    end = "<|im_end|>"
    # TRL closes every plain-text response with the tokenizer's EOS (here <|endoftext|>)
    # unless it already ends with it; twodrl's sequences end at the end-of-turn token.
    pad = tok.pad_token
    tok.eos_token = end
    tok.pad_token = pad

    def prompt_text(prompt: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    rows = [{"prompt": prompt_text(p["prompt"]), "chosen": p["chosen"] + end, "rejected": p["rejected"] + end}
            for p in pairs]
    args = DPOConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=0.0, beta=BETA, loss_type=["sigmoid"], max_length=max_length, use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", bf16=False, fp16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    # The first batch of our own order, through TRL's own collator and loss, before any update.
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
    with torch.no_grad():
        trainer.model.eval()
        first_loss = float(trainer.compute_loss(trainer.model, first))
        trainer.model.train()

    seen = {"tokens": 0}

    class CountTokens(TrainerCallback):
        pass

    original = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        seen["tokens"] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *a, **k)

    trainer.training_step = counting_step
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    return {"tokens": seen["tokens"], "seconds": elapsed, "tokens_per_s": seen["tokens"] / elapsed,
            "first_loss": first_loss, "peak_rss_mb": peak_rss_mb()}


def twodrl_first_loss(pairs, policy_dir, ref_dir, batch, max_length) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twodrl import objectives
    from twodrl.config import LearnerConfig

    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "right"
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    enc = objectives.collate_pairs(tok, [one_segment(p) for p in pairs[:batch]], ["helpfulness"], max_length)
    with torch.no_grad():
        lp, _ = objectives.forward_token_logps(policy, enc)
        ref_lp, _ = objectives.forward_token_logps(ref, enc)
        loss, _ = objectives.compute_preference_loss("dpo", {"token_logps": lp, "logits": None},
                                                     {"token_logps": ref_lp}, enc,
                                                     LearnerConfig(beta=BETA, sft_coef=0.0), [1.0])
    return float(loss)


# --------------------------------------------------------------------------- driver


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    pairs = make_pairs(args.pairs)
    policy_dir, ref_dir = build_models(workdir)
    if args.child == "twodrl":
        out = run_twodrl(pairs, policy_dir, ref_dir, args.steps, args.batch_size, args.max_length)
        out["first_loss"] = twodrl_first_loss(pairs, policy_dir, ref_dir, args.batch_size, args.max_length)
    else:
        out = run_trl(pairs, policy_dir, ref_dir, args.steps, args.batch_size, args.max_length, workdir)
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(name: str, args, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--workdir", str(workdir), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--pairs", str(args.pairs),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--steps", type=int, default=64)  # two epochs of the 256 pairs at batch 8
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each framework, alternating; the median is reported")
    p.add_argument("--child", choices=("twodrl", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_offline: trl is not installed (pip install -e .[bench]); nothing measured")
        return 0
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        workdir = Path(tmp)
        runs: dict[str, list[dict]] = {"twodrl": [], "trl": []}
        # Each framework in its own process (peak memory is then its own, and neither
        # warms caches for the other), alternating, so that a change of load on a
        # shared machine hits both; the median run of each is reported.
        order = [name for _ in range(args.repeats) for name in ("twodrl", "trl")]
        for name in tqdm(order, desc="bench_offline", unit="run"):
            runs[name].append(_run_child(name, args, workdir))
    ours, theirs = (_median_run(runs[n]) for n in ("twodrl", "trl"))
    out = {
        "twodrl_tokens_per_s": ours["tokens_per_s"],
        "trl_tokens_per_s": theirs["tokens_per_s"],
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "first_step_loss_diff": abs(ours["first_loss"] - theirs["first_loss"]),
        "twodrl_first_loss": ours["first_loss"],
        "trl_first_loss": theirs["first_loss"],
        "twodrl_peak_rss_mb": ours["peak_rss_mb"],
        "trl_peak_rss_mb": theirs["peak_rss_mb"],
        "twodrl_seconds": ours["seconds"],
        "trl_seconds": theirs["seconds"],
        "twodrl_tokens": ours["tokens"],
        "trl_tokens": theirs["tokens"],
        "twodrl_tokens_per_s_runs": [r["tokens_per_s"] for r in runs["twodrl"]],
        "trl_tokens_per_s_runs": [r["tokens_per_s"] for r in runs["trl"]],
        "repeats": args.repeats,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "pairs": args.pairs,
        "threads": args.threads,
    }
    print(f"twodrl  {out['twodrl_tokens_per_s']:10.0f} tokens/s  peak RSS {out['twodrl_peak_rss_mb']:.0f} MB  "
          f"({ours['tokens']} tokens in {ours['seconds']:.1f} s)")
    print(f"TRL     {out['trl_tokens_per_s']:10.0f} tokens/s  peak RSS {out['trl_peak_rss_mb']:.0f} MB  "
          f"({theirs['tokens']} tokens in {theirs['seconds']:.1f} s)")
    print(f"speedup {out['speedup']:.2f}x   first-step loss twodrl {ours['first_loss']:.6f} TRL {theirs['first_loss']:.6f} "
          f"|Δ| {out['first_step_loss_diff']:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
