"""The cluster planner (twodrl/planner.py) and `twodrl plan` (jobs/plan.py): parameter
counts, ZeRO / activation / vLLM arithmetic, bin-packing, the acceptance commands, and the
production configs in configs/ (each loads, and fits the cluster its header names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.plan import main as plan_main
from twodrl.config import load_config
from twodrl.planner import (
    GIB,
    KNOWN_ARCHITECTURES,
    Architecture,
    Cluster,
    PlanError,
    PlanOptions,
    activation_bytes_per_token,
    learner_activation_gb,
    learner_memory,
    plan,
    resolve_architecture,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QWEN = ROOT / "configs" / "qwen2-7b-2ddpo-a100.yaml"


def cfg(path=QWEN, *overrides):
    return load_config(path, list(overrides))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    c = load_config(path)
    assert c.aspects.names and abs(sum(c.aspects.weights) - 1) < 1e-9


def test_production_configs_exist_with_paper_hyperparameters():
    names = {p.name for p in CONFIGS}
    assert {"qwen2-7b-2ddpo-a100.yaml", "llama3-8b-2ddpo-a100.yaml", "mistral-7b-dpa.yaml", "qwen2-7b-appo.yaml"} <= names
    for name in ("qwen2-7b-2ddpo-a100.yaml", "llama3-8b-2ddpo-a100.yaml"):
        c = cfg(ROOT / "configs" / name)
        assert c.algorithm == "2d-dpo"
        assert (c.learner.beta, c.learner.sft_coef, c.learner.lr, c.learner.lr_schedule) == (0.2, 0.1, 1e-7, "cosine")
        assert (c.rollout.prompts_per_round, c.rollout.samples_per_prompt) == (1000, 4)
        assert (c.rollout.temperature, c.rollout.top_p) == (0.7, 0.8)
        assert c.aspects.weights == [0.3, 0.4, 0.1, 0.1, 0.1]
        # Global batch 64, as the paper's 8 GPUs × 1 × 8 accumulation.
        assert c.learner.num_ranks * c.learner.micro_batch_size * c.learner.grad_accum_steps == 64
        assert c.learner.bf16
    qwen = cfg()
    assert qwen.policy.path == "Qwen/Qwen2-7B-Instruct"
    assert resolve_architecture(qwen.scorer.model.path).name == "qwen2-72b"
    dpa = cfg(ROOT / "configs" / "mistral-7b-dpa.yaml")
    assert dpa.algorithm == "dpa-rsf" and dpa.learner.lr == 1e-5 and dpa.dpa.replay_fraction == 0.15
    assert dpa.dpa.directions_per_prompt == 5 and dpa.rollout.samples_per_prompt == 16
    appo = cfg(ROOT / "configs" / "qwen2-7b-appo.yaml")
    assert appo.algorithm == "appo" and (appo.rollout.temperature, appo.rollout.top_p) == (0.95, 0.99)
    assert appo.rollout.samples_per_prompt == 8


@pytest.mark.parametrize("path", [p for p in CONFIGS if "--nodes" in p.read_text()], ids=lambda p: p.name)
def test_each_production_config_fits_the_cluster_its_header_names(path):
    """The `twodrl plan ... --nodes N --gpus-per-node G --gpu-memory-gb M` line in each
    config's header comment is true: the plan fits and uses every GPU it names."""
    m = re.search(r"--nodes (\d+)\s*(?:#\s*)?--gpus-per-node (\d+)\s*(?:#\s*)?--gpu-memory-gb (\d+)", path.read_text())
    assert m, f"{path.name}: header names no complete `twodrl plan` command"
    nodes, gpus, mem = map(int, m.groups())
    p = plan(cfg(path), Cluster(nodes, gpus, mem))
    assert p.fits, p.format()
    assert p.gpus_used == nodes * gpus, f"{path.name} leaves GPUs idle:\n{p.format()}"


# --------------------------------------------------------------------------- architectures


def test_parameter_counts_match_the_published_checkpoints():
    # Sizes of the released safetensors checkpoints (total_size / 2 bytes).
    published = {
        "qwen2-7b": 7_615_616_512,
        "qwen2-72b": 72_706_203_648,
        "llama-3-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
    }
    for name, n in published.items():
        assert KNOWN_ARCHITECTURES[name].num_params() == n, name


def test_resolve_by_name_and_from_a_local_config_json(tmp_path):
    assert resolve_architecture("Qwen/Qwen2-72B-Instruct").name == "qwen2-72b"
    assert resolve_architecture("Qwen/Qwen2-7B-Instruct").name == "qwen2-7b"
    assert resolve_architecture("meta-llama/Meta-Llama-3-8B-Instruct").name == "llama-3-8b"
    assert resolve_architecture("HuggingFaceH4/mistral-7b-sft-beta").name == "mistral-7b"
    cfg_json = {
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "intermediate_size": 128,
        "max_position_embeddings": 256, "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    arch = resolve_architecture(str(tmp_path))
    assert (arch.num_layers, arch.kv_size, arch.tie_word_embeddings) == (2, 32, True)
    # embed + 2 × (q 64·64 + k,v 2·64·32 + o 64·64 + mlp 3·64·128 + norms 2·64) + final norm; tied head
    assert arch.num_params() == 100 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 128) + 64
    with pytest.raises(PlanError, match="unknown model 'someone/gpt-9'"):
        resolve_architecture("someone/gpt-9")


# --------------------------------------------------------------------------- memory arithmetic


def _small_cfg(**learner):
    overrides = [f"learner.{k}={v}" for k, v in learner.items()]
    return load_config(None, ["policy.max_length=1024", "learner.num_gpus_per_rank=1", *overrides])


def test_zero_stage_arithmetic_per_rank():
    arch = KNOWN_ARCHITECTURES["llama-3-8b"]
    psi, n = arch.num_params(), 8
    opts = PlanOptions(activation_gb=0.0, overhead_gb=0.0)
    mem = {
        s: learner_memory(_small_cfg(zero_stage=s, num_ranks=n, bf16="true", colocate_reference="false"), arch, None, opts)
        for s in (0, 1, 2, 3)
    }
    g = lambda b: b / GIB  # noqa: E731
    assert mem[0]["params"] == pytest.approx(g(2 * psi)) and mem[0]["optim"] == pytest.approx(g(12 * psi))
    assert mem[1]["optim"] == pytest.approx(g(12 * psi / n)) and mem[1]["grads"] == pytest.approx(g(2 * psi))
    assert mem[2]["grads"] == pytest.approx(g(2 * psi / n)) and mem[2]["params"] == pytest.approx(g(2 * psi))
    assert mem[3]["params"] == pytest.approx(g(2 * psi / n)) and mem[3]["gather"] == pytest.approx(g(2e9))
    totals = [sum(mem[s].values()) for s in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True)
    # fp32 training: 4Ψ params + 4Ψ grads + 8Ψ Adam moments (no separate master copy).
    fp32 = learner_memory(_small_cfg(zero_stage=0, num_ranks=n, bf16="false", colocate_reference="false"), arch, None, opts)
    assert sum(fp32.values()) == pytest.approx(g(16 * psi))


def test_colocated_reference_is_partitioned_only_under_zero3():
    arch = KNOWN_ARCHITECTURES["qwen2-7b"]
    opts = PlanOptions(activation_gb=0.0)
    z2 = learner_memory(_small_cfg(zero_stage=2, num_ranks=4, bf16="true"), arch, arch, opts)
    z3 = learner_memory(_small_cfg(zero_stage=3, num_ranks=4, bf16="true"), arch, arch, opts)
    assert z2["reference"] == pytest.approx(2 * arch.num_params() / GIB)
    assert z3["reference"] == pytest.approx(z2["reference"] / 4)


def test_activation_estimate_formula_and_its_levers():
    arch = KNOWN_ARCHITECTURES["qwen2-7b"]
    base = _small_cfg(micro_batch_size=1)
    h, kv, i, L, V = arch.hidden_size, arch.kv_size, arch.intermediate_size, arch.num_layers, arch.vocab_size
    tokens = 2 * 1024  # chosen + rejected
    expected = tokens * (L * (22 * h + 4 * kv + 8 * i) + 8 * h + V * 10) / GIB
    assert learner_activation_gb(base, arch) == pytest.approx(expected)
    ckpt = _small_cfg(micro_batch_size=1, gradient_checkpointing="true")
    assert learner_activation_gb(ckpt, arch) < learner_activation_gb(base, arch) / 2
    assert learner_activation_gb(_small_cfg(micro_batch_size=2), arch) == pytest.approx(2 * expected)
    appo = load_config(None, ["algorithm=appo", "policy.max_length=1024", "learner.micro_batch_size=1"])
    assert learner_activation_gb(appo, arch) == pytest.approx(expected / 2)


def _saved_activation_bytes(checkpointing: bool, seq: int = 128) -> tuple[int, int, Architecture]:
    """Bytes autograd keeps for a forward of a real (tiny, random) Hugging Face Qwen2 in
    bf16 — the tensors saved for backward, parameters excluded — split into the decoder
    body and the output head (the log-softmax over the vocabulary)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), t.shape[-1] == cfg.vocab_size)
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).mean()
    body = sum(n for n, head in saved.values() if not head)
    head = sum(n for n, head in saved.values() if head)
    arch = Architecture("tiny-qwen2", 2, 128, 4, 2, 512, 352, 512, qkv_bias=True)
    return body, head, arch


@pytest.mark.integration  # imports transformers and runs a real model: seconds, not milliseconds
def test_activation_formula_matches_what_autograd_keeps_for_a_real_layer():
    seq = 128
    body, head, arch = _saved_activation_bytes(checkpointing=False, seq=seq)
    per_token, head_per_token = activation_bytes_per_token(arch, gradient_checkpointing=False)
    assert body == pytest.approx(seq * per_token, rel=0.10)
    assert head <= seq * head_per_token  # the 10-byte head allowance covers the fp32 log-softmax
    # With checkpointing only the layer inputs (+ final norm) stay; the estimate adds one
    # recomputed layer on top, the backward peak.
    body_ckpt, _, _ = _saved_activation_bytes(checkpointing=True, seq=seq)
    per_token_ckpt, _ = activation_bytes_per_token(arch, gradient_checkpointing=True)
    layer = 22 * arch.hidden_size + 4 * arch.kv_size + 8 * arch.intermediate_size
    assert body_ckpt == pytest.approx(seq * (per_token_ckpt - layer), rel=0.10)


# --------------------------------------------------------------------------- placement


def test_acceptance_4x8_a100_80gb_fits_with_tp_groups_inside_nodes():
    p = plan(cfg(), Cluster(4, 8, 80))
    assert p.fits, p.format()
    assert p.gpus_used == 32
    assert p.gpu_requests() == {"learner": 16, "rollout": 8, "scorer": 8}
    seen = set()
    for a in p.actors:
        if a.on_gpu:
            assert a.node is not None and len(a.gpus) == a.bundles
            for g in a.gpus:
                assert (a.node, g) not in seen, "two whole-GPU actors on one GPU"
                seen.add((a.node, g))
    scorers = [a for a in p.actors if a.role == "scorer"]
    assert all(len(a.gpus) == 4 for a in scorers)
    # Every learner GPU also holds the colocated reference.
    assert all("reference" in a.memory for a in p.actors if a.role == "learner")
    for ts in p.gpu_tenants().values():
        assert sum(t.gpu_memory_gb for t in ts) <= 80


def test_acceptance_1x8_24gb_names_what_does_not_fit():
    p = plan(cfg(), Cluster(1, 8, 24))
    assert not p.fits
    text = "\n".join(p.problems)
    assert re.search(r"learner-0: needs [\d.]+ GiB per GPU > 24 GiB", text)
    assert re.search(r"scorer-0: needs [\d.]+ GiB per GPU > 24 GiB", text)
    assert "not placed" in text and "the cluster has 8" in text


def test_cli_exit_codes_and_messages(capsys):
    assert plan_main([str(QWEN), "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "scorer-0..1" in out and "learner-0..7" in out
    assert plan_main([str(QWEN), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "24"]) == 1
    captured = capsys.readouterr()
    assert "fits: NO" in captured.out
    assert "does not fit" in captured.err and "scorer-0: needs" in captured.err
    # A mistake in the config is a usage error (2), naming the field.
    assert plan_main([str(QWEN), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80",
                      "--set", "learner.zero_stag=3"]) == 2
    assert "learner.zero_stag" in capsys.readouterr().err


def test_tensor_parallel_groups_must_divide_heads_and_fit_in_a_node():
    p = plan(cfg(QWEN, "scorer.tensor_parallel_size=3"), Cluster(4, 8, 80))
    assert any("scorer.tensor_parallel_size=3 does not divide the 64 attention heads" in m for m in p.problems)
    p = plan(cfg(QWEN, "scorer.tensor_parallel_size=8", "scorer.num_workers=1"), Cluster(8, 4, 80))
    assert any("needs 8 GPUs on one node, but nodes have 4" in m for m in p.problems)


def test_best_fit_packs_tp_groups_before_opening_a_node():
    # 3 TP-4 scorer engines + 4 one-GPU engines on 2 × 8: the three groups take node 0 and
    # half of node 1, the single engines fill node 1 — no group split across nodes.
    # The learner on CPU isolates the packing of the engines.
    c = cfg(QWEN, "scorer.num_workers=3", "rollout.num_workers=4", "learner.num_gpus_per_rank=0")
    p = plan(c, Cluster(2, 8, 80))
    assert p.fits, p.format()
    nodes = [a.node for a in p.actors if a.role == "scorer"]
    assert sorted(nodes) == [0, 0, 1]
    assert {a.node for a in p.actors if a.role == "rollout"} == {1}


def test_fractional_shares_colocate_and_memory_is_summed():
    c = cfg(QWEN, "learner.num_ranks=1", "learner.num_gpus_per_rank=0.5", "rollout.num_workers=1",
            "rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.4", "scorer.num_gpus=0",
            "learner.grad_accum_steps=64")
    p = plan(c, Cluster(1, 1, 80))
    tenants = p.gpu_tenants()[(0, 0)]
    assert {t.role for t in tenants} == {"learner", "rollout"}
    # ZeRO over one rank: 7.6B × (2 + 2 + 12) bytes alone is ~113 GiB, plus vLLM's 32 GiB.
    assert any(m.startswith("learner-0: needs") for m in p.problems)
    assert any(m.startswith("node0 gpu0: learner-0") and "rollout-0" in m for m in p.problems)


def test_kv_cache_that_cannot_hold_one_sequence_is_reported():
    p = plan(cfg(QWEN, "rollout.gpu_memory_utilization=0.2"), Cluster(4, 8, 80))
    assert any("rollout: vLLM KV cache" in m and "rollout.gpu_memory_utilization" in m for m in p.problems)


def test_docs_plan_example_is_the_current_planner_output(capsys, monkeypatch):
    """docs/plan-example.txt (shown in the README) is regenerated output, not hand-edited."""
    monkeypatch.chdir(ROOT)
    assert plan_main(["configs/qwen2-7b-2ddpo-a100.yaml", "--nodes", "4", "--gpus-per-node", "8",
                      "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    doc = (ROOT / "docs" / "plan-example.txt").read_text()
    assert out.strip() in doc, "regenerate docs/plan-example.txt (command in its first line)"


def test_architecture_kv_bytes():
    a = Architecture("x", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, vocab_size=10,
                     intermediate_size=128, max_position_embeddings=128)
    assert a.kv_bytes_per_token(tp=1) == 2 * 2 * 2 * 8 * 2
    assert a.kv_bytes_per_token(tp=4) == 2 * 2 * 1 * 8 * 2  # KV heads replicated past 2-way TP


def test_cpu_slots_are_checked_only_when_given():
    unchecked = plan(cfg(), Cluster(4, 8, 80))
    assert all(a.node is None for a in unchecked.actors if not a.on_gpu)  # "any" node
    tight = plan(cfg(), Cluster(4, 8, 80, cpus_per_node=16))
    assert any("asks for" not in m and "32 CPUs > 16" in m and "learner.num_cpus_per_rank" in m for m in tight.problems)
    roomy = plan(cfg(), Cluster(4, 8, 80, cpus_per_node=88))
    assert roomy.fits, roomy.format()
    assert all(a.node is not None for a in roomy.actors if a.role == "annotator")
