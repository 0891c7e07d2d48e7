"""GPU check of the pure core, for a lent GPU machine that has only torch and
transformers (no Ray, vLLM or DeepSpeed):

1. the loss family (``twodrl.losses``) on CUDA in bfloat16 against CPU float64;
2. the log-prob engine (``twodrl.objectives.forward_token_logps``) of a random Qwen2
   model on CUDA in bfloat16 against the same model on CPU in float64;
3. a few offline DPO training steps (the learner's step: cached reference log-probs,
   ``compute_preference_loss``, AdamW on fp32 master weights under bf16 autocast) of a
   random model shaped like Qwen2-0.5B, with its tokens/s and model FLOPs utilisation
   (6 × parameters × tokens per second over the GPU's dense bf16 peak).

Takes well under 5 minutes on one H100/H200-class GPU. Writes a JSON of every figure
(``--json``, default ``gpu_check.json``). Without CUDA it says so, runs the CPU parts
on a tiny model (float32 against float64) and exits 0.

    python scripts/gpu_check.py [--json PATH] [--steps 6] [--seq-len 512] [--pairs 4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twodrl import losses, objectives  # noqa: E402  (pure torch modules)

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --------------------------------------------------------------------------- 1. losses


def pair_inputs(B: int, T: int, S: int, A: int, V: int, seed: int = 0) -> dict:
    """Random pair tensors in float64 on CPU: token log-ratios/log-probs, segment ids
    (contiguous runs after a prompt), 0–4 ratings, and small logits for TDPO's KL."""
    g = torch.Generator().manual_seed(seed)

    def side():
        seg = torch.full((B, T), -1, dtype=torch.long)
        for b in range(B):
            n = int(torch.randint(2, S + 1, (1,), generator=g))
            cuts = sorted(torch.randperm(T // 2 - 1, generator=g)[: n - 1].add(1).tolist())
            edges = [0, *cuts, T // 2]
            for k in range(n):
                seg[b, T // 4 + edges[k]: T // 4 + edges[k + 1]] = k
        mask = seg >= 0
        logp = torch.where(mask, -torch.rand(B, T, generator=g, dtype=torch.float64) * 3, torch.zeros((), dtype=torch.float64))
        ref = torch.where(mask, logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1, torch.zeros((), dtype=torch.float64))
        scores = torch.randint(0, 5, (B, S, A), generator=g).double()
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
        ref_logits = logits + torch.randn(B, T, V, generator=g, dtype=torch.float64) * 0.1
        return dict(seg=seg, mask=mask, logp=logp, ref=ref, scores=scores, logits=logits, ref_logits=ref_logits)

    return {"c": side(), "r": side()}


def loss_family(x: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every loss of the family on ``device`` with inputs cast to ``dtype``; results as
    float64 on CPU."""
    c = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in x["c"].items()}
    r = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in x["r"].items()}
    seq = {s: losses.sequence_logps(d["logp"], d["mask"]) for s, d in (("c", c), ("r", r))}
    ref = {s: losses.sequence_logps(d["ref"], d["mask"]) for s, d in (("c", c), ("r", r))}
    n = {s: d["mask"].sum(-1).clamp(min=1).to(dtype) for s, d in (("c", c), ("r", r))}
    avg = {s: seq[s] / n[s] for s in seq}
    ref_avg = {s: ref[s] / n[s] for s in ref}
    kl = {s: losses.per_token_kl(d["logits"], d["ref_logits"], d["mask"]) for s, d in (("c", c), ("r", r))}
    weights = [0.3, 0.4, 0.1, 0.1, 0.1]
    out = {
        "dpo": losses.dpo_loss(seq["c"], seq["r"], ref["c"], ref["r"], beta=0.2),
        "ipo": losses.ipo_loss(avg["c"], avg["r"], ref_avg["c"], ref_avg["r"], beta=0.2),
        "kto": losses.kto_loss(seq["c"], seq["r"], ref["c"], ref["r"], beta=0.2),
        "orpo": losses.orpo_loss(avg["c"], avg["r"], lam=0.1),
        "simpo": losses.simpo_loss(avg["c"], avg["r"], beta=2.0, gamma=0.5),
        "tdpo2": losses.tdpo_loss(seq["c"], seq["r"], ref["c"], ref["r"], kl["c"], kl["r"], beta=0.2, alpha=0.5,
                                  version=2),
        "2d-dpo": losses.two_d_dpo_loss(c["logp"] - c["ref"], r["logp"] - r["ref"], c["seg"], r["seg"],
                                        c["scores"], r["scores"], weights, beta=0.2),
        "2d-dpo-ungrouped": losses.two_d_dpo_ungrouped_loss(c["logp"] - c["ref"], r["logp"] - r["ref"], c["seg"],
                                                            r["seg"], c["scores"], r["scores"], weights, beta=0.2),
    }
    return {k: v.detach().double().cpu() for k, v in out.items()}


def check_losses(device: torch.device, dtype: torch.dtype, small: bool) -> dict:
    x = pair_inputs(B=4 if small else 16, T=64 if small else 1024, S=6 if small else 32, A=5, V=32 if small else 256)
    want = loss_family(x, torch.device("cpu"), torch.float64)
    got = loss_family(x, device, dtype)
    out = {}
    for k in want:
        rel = float(((got[k] - want[k]).abs() / want[k].abs().clamp(min=1e-3)).max())
        out[k] = {"max_abs": float((got[k] - want[k]).abs().max()), "max_rel": rel}
    return out


# --------------------------------------------------------------------------- 2. log-probs


def random_model(shape: dict, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg)


def random_pairs(P: int, T: int, V: int, seed: int = 0) -> objectives.SequenceBatch:
    """P pairs of random token ids: a prompt of T/4 tokens, responses of varying length."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (T // 4,), generator=g).tolist() for _ in range(P)]
    responses = [torch.randint(0, V, (int(torch.randint(T // 4, 3 * T // 4, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(2 * P)]
    batch = objectives.collate_token_ids(prompts + prompts, responses)
    batch.num_pairs = P
    return batch


def check_logprobs(device: torch.device, dtype: torch.dtype, shape: dict, T: int) -> dict:
    model = random_model(shape)
    batch = random_pairs(2, T, shape["vocab_size"])
    with torch.no_grad():
        want, _ = objectives.forward_token_logps(model.double().eval(), batch)
        fast = model.to(device=device, dtype=dtype).eval()
        got, _ = objectives.forward_token_logps(fast, batch.to(device))
    m = batch.response_mask
    diff = (got.double().cpu() - want)[m].abs()
    seq_rel = ((got.double().cpu() * m).sum(-1) - (want * m).sum(-1)).abs() / (want * m).sum(-1).abs()
    return {"token_max_abs": float(diff.max()), "token_mean_abs": float(diff.mean()),
            "sequence_max_rel": float(seq_rel.max())}


# --------------------------------------------------------------------------- 3. training


def train_steps(device: torch.device, shape: dict, steps: int, pairs: int, T: int) -> dict:
    from types import SimpleNamespace

    model = random_model(shape).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
    cfg = SimpleNamespace(beta=0.2, sft_coef=0.1, label_smoothing=0.0)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [random_pairs(pairs, T, shape["vocab_size"], seed=s).to(device) for s in range(steps)]
    with torch.no_grad(), autocast:  # the cached reference: the initial policy, once
        refs = [objectives.forward_token_logps(model, b)[0].float() for b in batches]
    losses_seen, tokens, t_start = [], 0, None
    for i, (b, ref) in enumerate(zip(batches, refs)):
        if i == 1:  # step 0 warms up kernels and the allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_start, tokens = time.perf_counter(), 0
        with autocast:
            lp, _ = objectives.forward_token_logps(model, b)
        loss, _ = objectives.compute_preference_loss("dpo", {"token_logps": lp.float(), "logits": None},
                                                     {"token_logps": ref}, b, cfg, [1.0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses_seen.append(float(loss.detach()))
        tokens += int(b.attention_mask.sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    tps = tokens / elapsed if elapsed > 0 and steps > 1 else float("nan")
    peak = peak_flops(device)
    return {
        "params": n_params, "steps": steps, "pairs_per_step": pairs, "seq_len": T, "losses": losses_seen,
        "finite": all(math.isfinite(v) for v in losses_seen), "tokens_per_s": tps,
        "model_tflops_per_s": 6 * n_params * tps / 1e12 if math.isfinite(tps) else None,
        "mfu": (6 * n_params * tps / peak) if peak and math.isfinite(tps) else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if not cuda:
        print("gpu_check: no CUDA device here; running the CPU parts small (float32 against float64)")
    dtype = torch.bfloat16 if cuda else torch.float32
    report: dict = {"cuda": cuda, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}
    t0 = time.perf_counter()
    report["losses"] = check_losses(device, dtype, small=not cuda)
    worst = max(v["max_rel"] for v in report["losses"].values())
    print(f"losses ({report['dtype']} vs float64): worst relative error {worst:.2e}")
    for name, v in report["losses"].items():
        print(f"  {name:18s} max |Δ| {v['max_abs']:.2e}  max rel {v['max_rel']:.2e}")
    report["logprobs"] = check_logprobs(device, dtype, QWEN2_05B if cuda else TINY, args.seq_len if cuda else 64)
    lp = report["logprobs"]
    print(f"log-probs: token max |Δ| {lp['token_max_abs']:.3e} mean {lp['token_mean_abs']:.3e}, "
          f"sequence max rel {lp['sequence_max_rel']:.2e}")
    report["train"] = train_steps(device, QWEN2_05B if cuda else TINY, args.steps if cuda else 3,
                                  args.pairs if cuda else 2, args.seq_len if cuda else 64)
    tr = report["train"]
    mfu = f"{100 * tr['mfu']:.1f}%" if tr["mfu"] is not None else "n/a (unknown peak or no GPU)"
    print(f"train: {tr['params'] / 1e6:.0f}M params, {tr['steps']} steps, losses {[round(v, 4) for v in tr['losses']]}, "
          f"{tr['tokens_per_s']:.0f} tokens/s, MFU {mfu}")
    # Tolerances: bf16 has an 8-bit mantissa (~4e-3 relative per value); float32 on CPU
    # should match float64 to ~1e-5.
    tol_loss, tol_seq = (5e-2, 5e-2) if cuda else (1e-4, 1e-4)
    report["ok"] = bool(worst <= tol_loss and lp["sequence_max_rel"] <= tol_seq and tr["finite"])
    report["seconds"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"gpu_check: {'OK' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s; figures in {args.json}")
    return 0 if report["ok"] or not cuda else 1


if __name__ == "__main__":
    sys.exit(main())
