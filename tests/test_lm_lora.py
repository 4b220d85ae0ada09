"""LoRA on the tiny GPT-2 (Conv1D projections): cl_lab's adapters equal PEFT's (fan_in_fan_out=True, same targets,
rank, α and initialisation) in weights, logits and one optimizer step; targets, merging, routing and the LM
methods through the adapters; bad arguments named."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from cl_lab import train
from cl_lab.lm import LMClassifier, TextReplay, fact_stream, tiny_lm
from cl_lab.lm.lora import ThroughAdapters, adapter_pairs, lora_lm, lora_targets, peft_twin
from cl_lab.methods.lora import LoRALinear, PerTaskLoRA, SharedLoRA, target_names

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


@pytest.fixture(scope="module")
def lab():
    return tiny_lm(0, progress=False, use_cache=False, **TINY)


@pytest.fixture(scope="module")
def batch(lab):
    task = fact_stream(lab, 1, "subjects", n_subjects=4).tasks[0]
    x, y, _ = task.sample(24, seed=0)
    return x, y


def _twin_logits(twin, lab, x):
    return LMClassifier(twin, lab.tokenizer.pad_token_id)(x)


def _randomise_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers():
            layer.B[0].copy_(0.05 * torch.randn(layer.B[0].shape, generator=gen))


def test_adapted_modules_and_trainable_parameters_are_peft_s(lab):
    model = lora_lm(lab, rank=4, alpha=8.0)
    twin = peft_twin(model)
    ours = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    theirs = [p.shape for n, p in twin.named_parameters() if p.requires_grad]
    assert sum(math.prod(s) for s in ours.values()) == sum(math.prod(s) for s in theirs)
    assert [(a.shape, b.shape) for a, b in adapter_pairs(model, twin)] == [(a.shape, a.shape) for a, _ in
                                                                          adapter_pairs(model, twin)]
    adapted = {n for n, m in model.net.lm.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                            "mlp.c_proj")}
    assert all(m.fan_in_fan_out and isinstance(m.base, Conv1D) for m in model.lora_layers())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_initialisation_is_peft_s_distribution_and_starts_at_the_base_model(lab, batch):
    from peft import LoraConfig, get_peft_model

    model = lora_lm(lab, rank=8, alpha=16.0, seed=3)
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(lora_targets(lab.model)), fan_in_fan_out=True)
    reference = get_peft_model(lab.copy().model, config)  # PEFT's own initialisation, not a copy of ours
    ours = torch.cat([layer.A[0].flatten() * math.sqrt(layer.in_features) for layer in model.lora_layers()])
    theirs = torch.cat([m.lora_A["default"].weight.flatten() * math.sqrt(m.in_features)
                        for m in reference.modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
    for a in (ours, theirs):  # U(−1/√d_in, 1/√d_in): scaled by √d_in, U(−1, 1) with std 1/√3
        assert a.abs().max() <= 1 and a.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.03)
    assert all(torch.count_nonzero(layer.B[0]) == 0 for layer in model.lora_layers())
    assert all(torch.count_nonzero(m.lora_B["default"].weight) == 0 for m in reference.modules()
               if hasattr(m, "lora_B") and "default" in m.lora_B)
    x, _ = batch
    with torch.no_grad():
        base = lab.as_classifier()(x)
        assert torch.equal(model.net(x), base)
        assert torch.equal(LMClassifier(reference, lab.tokenizer.pad_token_id)(x), base)


def test_same_logits_as_peft_with_a_trained_looking_adapter(lab, batch):
    model = lora_lm(lab, rank=4, alpha=12.0, seed=1)
    _randomise_b(model)
    twin = peft_twin(model)
    x, _ = batch
    with torch.no_grad():
        ours, theirs = model.net(x), _twin_logits(twin, lab, x)
        assert (ours - lab.as_classifier()(x)).abs().max() > 1e-2  # the adapter changes the logits
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
@pytest.mark.parametrize("where", ["all", "attention", "mlp"])
def test_one_identical_step_gives_the_same_adapter_weights(lab, batch, optimizer, where):
    model = lora_lm(lab, rank=4, alpha=8.0, where=where, seed=2)
    _randomise_b(model)  # B ≠ 0, so A gets a gradient too
    twin = peft_twin(model)
    pairs = adapter_pairs(model, twin)
    x, y = batch
    opt_ours = optimizer([a for a, _ in pairs], lr=1e-2)
    opt_theirs = optimizer([b for _, b in pairs], lr=1e-2)
    F.cross_entropy(model.net(x), y).backward()
    F.cross_entropy(_twin_logits(twin, lab, x), y).backward()
    assert all(a.grad.abs().max() > 0 for a, _ in pairs)
    assert max((a.grad - b.grad).abs().max().item() for a, b in pairs) <= 1e-6
    before = [a.detach().clone() for a, _ in pairs]
    opt_ours.step()
    opt_theirs.step()
    assert max((a - b).abs().max().item() for a, b in pairs) <= 1e-6
    assert all(not torch.equal(a, b0) for (a, _), b0 in zip(pairs, before))  # the step moved every tensor
    with torch.no_grad():
        assert (model.net(x) - _twin_logits(twin, lab, x)).abs().max().item() <= 1e-6


def test_targets_pick_attention_or_mlp_projections_in_every_block(lab):
    attention = lora_lm(lab, rank=2, alpha=2.0, where="attention")
    mlp = lora_lm(lab, rank=2, alpha=2.0, where="mlp")
    names = lambda m: {n.split(".", 3)[-1] for n, x in m.net.lm.named_modules() if isinstance(x, LoRALinear)}  # noqa: E731
    assert names(attention) == {"attn.c_attn", "attn.c_proj"}
    assert names(mlp) == {"mlp.c_fc", "mlp.c_proj"}
    d = lab.config.n_embd
    per_block = {"attention": 2 * (d + 3 * d) + 2 * (d + d), "mlp": 2 * (d + 4 * d) + 2 * (4 * d + d)}
    assert attention.adapter_size(0) == lab.config.n_layer * per_block["attention"]
    assert mlp.adapter_size(0) == lab.config.n_layer * per_block["mlp"]
    assert target_names(lab.model, ["c_proj"]) == [f"transformer.h.{i}.{p}" for i in range(2)
                                                   for p in ("attn.c_proj", "mlp.c_proj")]


def test_merged_conv1d_weights_compute_the_adapted_model(lab, batch):
    model = lora_lm(lab, rank=3, alpha=6.0)
    _randomise_b(model)
    plain = model.merged(0)
    x, _ = batch
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.net(x), atol=1e-5, rtol=1e-5)
        layer = model.lora_layers()[0]
        h = torch.randn(5, layer.in_features)
        by_hand = h @ layer.base.weight + layer.base.bias + (6.0 / 3) * (h @ layer.A[0].T) @ layer.B[0].T
        torch.testing.assert_close(layer(h), by_hand)  # y = x W + b + (α/r) x Aᵀ Bᵀ, W stored [in, out]


def test_shared_lora_with_text_replay_through_the_adapters_trains_only_adapters(lab):
    model = lora_lm(lab, rank=2, alpha=4.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    replay = TextReplay(lab, 0.3, seed=0)
    stream = fact_stream(lab, 1, "subjects", n_subjects=3)
    train.fit(model, stream, [SharedLoRA(), ThroughAdapters(replay)], steps=6, lr=1e-2, batch_size=16,
              progress=False)
    assert replay.share == pytest.approx(0.3, abs=0.05) and replay.replay_tokens > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(torch.count_nonzero(layer.B[0]) > 0 for layer in model.lora_layers())
    with pytest.raises(TypeError, match="LoRAModel|classifier"):
        train.fit(lora_lm(lab, rank=2, alpha=4.0), stream, [SharedLoRA(), TextReplay(lab, 0.3)], steps=1,
                  progress=False)


def test_per_task_lora_routes_old_tasks_to_unchanged_outputs(lab):
    stream = fact_stream(lab, 2, "subjects", n_subjects=3)
    model, method = lora_lm(lab, rank=2, alpha=4.0), PerTaskLoRA()
    run = train.fit(model, stream, method, steps=8, lr=1e-2, batch_size=16, progress=False)
    assert run.R[1, 0] == run.R[0, 0]
    x = stream.tasks[0].x_test
    with torch.no_grad(), model.using(method.adapter_of[0]):
        own = model.net(x)
    t = torch.zeros(len(x), dtype=torch.long)
    assert torch.equal(method.logits(model, stream, x, t), own)


@pytest.mark.parametrize("rank, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError)])
def test_bad_rank_is_named(lab, rank, error):
    with pytest.raises(error, match="rank"):
        lora_lm(lab, rank=rank)


@pytest.mark.parametrize("alpha", [0.0, -2.0])
def test_bad_alpha_is_named(lab, alpha):
    with pytest.raises(ValueError, match="alpha"):
        lora_lm(lab, rank=2, alpha=alpha)


def test_unknown_targets_and_where_are_named(lab):
    with pytest.raises(ValueError, match="targets .*'q_proj'"):
        lora_lm(lab, targets=["c_attn", "q_proj"])
    with pytest.raises(ValueError, match="targets"):
        lora_lm(lab, targets="c_attn")
    with pytest.raises(ValueError, match="where"):
        lora_lm(lab, where="embeddings")
    with pytest.raises(TypeError, match="lab"):
        lora_lm(lab.model)
    with pytest.raises(TypeError, match="method"):
        ThroughAdapters("replay")
