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


# ---------------------------------------------------------------- chapter 09's optimizer null


@pytest.fixture(scope="module")
def knowing_lab():
    """A tiny LM trained long enough to recall a few dozen facts: the null draws only facts the LM knows."""
    return tiny_lm(0, progress=False, use_cache=False, n_layer=2, n_head=2, n_embd=32, n_subjects=40, n_general=100,
                   n_general_test=20, steps=300, batch_size=32, lr=1e-2, warmup=10)


@pytest.fixture(scope="module")
def chapter_stream(knowing_lab):
    from cl_lab.chapters import ch09

    return ch09.lm_stream(knowing_lab, (("subjects", 2), ("relation", 3), ("format", 4)), n_pretrained=40, seed=1)


def test_null_stream_trains_known_facts_apart_from_the_scored_ones(knowing_lab, chapter_stream):
    from cl_lab.chapters import ch09
    from cl_lab.lm import nulls, recall

    null = ch09.null_stream(knowing_lab, chapter_stream, seed=0)
    scored = nulls.fact_keys(chapter_stream.eval_tasks[0].train_facts)
    keys = [nulls.fact_keys(t.train_facts) for t in null.tasks]
    assert null.eval_tasks == [chapter_stream.eval_tasks[0]] and len(null.tasks) == len(chapter_stream.tasks)
    assert all(not (k & scored) for k in keys) and not (keys[0] & keys[1]) and not (keys[1] & keys[2])
    assert [len(k) for k in keys] == [8, 3, 1]  # the chapter's prompts over the 4 renderings per fact, rounded
    assert ch09.renderings_per_fact(knowing_lab.world) == 4
    assert all(recall(knowing_lab.model, knowing_lab.tokenizer, t.train_facts) == 1.0 for t in null.tasks)
    assert {t.x_train.shape[1] for t in null.tasks} == {chapter_stream.input_shape[0]}
    assert ch09.null_stream(knowing_lab, chapter_stream, seed=0).tasks[0].train_facts == null.tasks[0].train_facts


def test_null_run_trains_like_the_learners_and_scores_the_same_facts(knowing_lab, chapter_stream):
    from cl_lab.chapters import ch09

    null = ch09.null_stream(knowing_lab, chapter_stream, seed=0)
    run = ch09.null_run(knowing_lab, null, "shared LoRA", rank=2, alpha=4.0, steps=3, lr=1e-2, max_facts=10)
    learner = ch09.run_setup(knowing_lab, chapter_stream, "shared LoRA", rank=2, alpha=4.0, steps=3, lr=1e-2,
                             max_facts=10)
    assert run.R.shape == (3, 1) and run.b[0] == learner.run.b[0]  # the same scored facts, from the same LM
    assert run.config["steps"] == 3 and run.config["lr"] == 1e-2 and run.config["optimizer"] == "adam"
    with pytest.raises(ValueError, match="shared learner"):
        ch09.null_run(knowing_lab, null, "per-task LoRA")


def test_schedule_sets_chapter_13_s_learning_rate_at_every_step_of_every_task(knowing_lab, chapter_stream):
    from cl_lab.chapters import ch09
    from cl_lab.lm import cpt
    from cl_lab.methods.base import Method

    seen = []

    class Spy(Method):
        def before_step(self, ctx):
            seen.append((ctx.task_index, ctx.task_step, ctx.optimizer.param_groups[0]["lr"]))

    null = ch09.null_stream(knowing_lab, chapter_stream, seed=0)
    train.fit(knowing_lab.copy().as_classifier(), null, [ch09.Schedule(5, warmup=0.4), Spy()], steps=5, lr=1e-3,
              batch_size=8, progress=False)
    expected = [cpt.lr_at(k, 5, "rewarm-flat", peak_lr=1e-3, warmup=0.4) for k in range(5)]
    assert [lr for task, _, lr in seen if task == 2] == pytest.approx(expected)  # restarted at each task
    assert expected[0] == pytest.approx(5e-4) and expected[-1] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup"):
        ch09.Schedule(5, warmup=1.5)


def test_optimizer_nulls_start_from_one_model_and_record_every_step(knowing_lab, chapter_stream):
    from cl_lab.chapters import ch09

    settings = {"Adam": ("adam", 1e-2, None), "warm": ("adam", 1e-2, 0.5), "SGD": ("sgd", 1e-3, None)}
    null = ch09.null_stream(knowing_lab, chapter_stream, seed=0)
    curves = ch09.optimizer_nulls(knowing_lab, null, steps=4, batch_size=8, settings=settings)
    assert list(curves.columns) == ["setting", "step", "recall"] and len(curves) == 3 * 5
    start = curves[curves.step == 0].recall
    assert start.nunique() == 1  # every setting starts from the pretrained LM, on the same scored facts
    sgd = curves[curves.setting == "SGD"].recall
    assert (sgd - start.iloc[0]).abs().max() <= 0.05  # SGD's tiny steps on known facts barely move anything
    fig = ch09.plot_optimizer_nulls(curves)
    assert len(fig.axes[0].lines) == 3


def test_first_step_sizes_adam_moves_every_touched_weight_by_about_lr(knowing_lab, chapter_stream):
    from cl_lab.chapters import ch09

    null = ch09.null_stream(knowing_lab, chapter_stream, seed=0)
    sizes = ch09.first_step_sizes(knowing_lab, null.tasks[0], lr_adam=1e-3, lr_sgd=0.1, batch_size=8)
    ratio = sizes["adam |Δθ|/lr"]  # [P]
    assert ratio.numel() == knowing_lab.n_parameters and float(ratio.max()) <= 1 + 1e-3
    assert 0.5 < sizes["with a gradient"] <= 1.0
    assert sizes["adam median |Δθ|"] == pytest.approx(1e-3, rel=0.02)  # −lr·g/(|g| + ε) for almost every g
    assert sizes["sgd median |Δθ|"] < sizes["adam median |Δθ|"]
