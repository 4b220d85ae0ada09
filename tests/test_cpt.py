"""Continual pretraining (cl_lab.lm.cpt): schedules, replay counted in tokens, vocabulary extension, the run."""

import math

import pytest
import torch

from cl_lab import lm
from cl_lab.lm import cpt
from cl_lab.lm.tokenizer import PAD, encode


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0, progress=False, **lm.SMOKE_CONFIG)


@pytest.fixture(scope="module")
def domain(lab):
    return lab.world.new_domain(4)


# --- schedules ------------------------------------------------------------------------------------------------

def test_rewarm_climbs_to_the_peak_then_decays_to_the_floor():
    lrs = [cpt.lr_at(s, 100, "rewarm", peak_lr=1e-3, warmup=0.1, floor=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # 1/W of the peak at the first step
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises again
    assert lrs[-1] == pytest.approx(1e-4)  # the floor, a tenth of the peak, at the last step


def test_constant_and_flat_schedules():
    assert {cpt.lr_at(s, 50, "constant", low_lr=3e-4) for s in range(50)} == {3e-4}
    flat = [cpt.lr_at(s, 50, "rewarm-flat", peak_lr=1e-3, warmup=0.2) for s in range(50)]
    assert flat[9] == pytest.approx(1e-3) and set(flat[10:]) == {1e-3}


@pytest.mark.parametrize("kwargs, match", [(dict(schedule="cosine"), "schedule"), (dict(step=10), "step"),
                                           (dict(warmup=1.0), "warmup"), (dict(peak_lr=0.0), "peak_lr")])
def test_lr_at_names_the_bad_argument(kwargs, match):
    args = dict(step=0, steps=10, schedule="rewarm") | kwargs
    with pytest.raises(ValueError, match=match):
        cpt.lr_at(args.pop("step"), args.pop("steps"), args.pop("schedule"), **args)


# --- replay in tokens -----------------------------------------------------------------------------------------

def _ids(lengths: list[int]) -> torch.Tensor:
    """Sentences of the given numbers of supervised tokens (bos + words + eos: length + 1 positions)."""
    out = torch.full((len(lengths), max(lengths) + 1), PAD)
    for i, n in enumerate(lengths):
        out[i, :n + 1] = 5
    return out


@pytest.mark.parametrize("share", [0.0, 0.01, 0.05, 0.25, 0.5])
def test_token_mixer_replays_the_share_of_tokens_not_of_sentences(share):
    new, old = _ids([12] * 10), _ids([3] * 10)  # old sentences a quarter as long as new ones
    mixer = cpt.TokenMixer(new, old, PAD, replay_share=share, batch_tokens=60, seed=1)
    for _ in range(200):
        batch = mixer.next_batch()
        assert batch.shape[1] <= 13 and (batch[:, 0] != PAD).all()  # trimmed to the longest, no empty row
    total = mixer.new_tokens + mixer.replay_tokens
    assert abs(mixer.token_share - share) <= 3 / total  # within one old sentence over the run
    # old sentences hold a quarter of a new one's tokens: 4s old sentences for every 1 − s new ones
    assert mixer.sentence_share == pytest.approx(4 * share / (1 + 3 * share), abs=0.01)


def test_token_mixer_batch_holds_about_batch_tokens_and_is_seeded():
    new, old = _ids([4, 6, 8, 10]), _ids([5, 7])
    a = cpt.TokenMixer(new, old, PAD, replay_share=0.25, batch_tokens=40, seed=3)
    b = cpt.TokenMixer(new, old, PAD, replay_share=0.25, batch_tokens=40, seed=3)
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x, y)
        tokens = int((x[:, 1:] != PAD).sum())
        assert 40 * 0.75 <= tokens <= 40 + 2 * 10  # the new part reaches its budget; replay adds about a quarter


def test_token_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="replay_share"):
        cpt.TokenMixer(_ids([3]), _ids([3]), PAD, replay_share=1.0)
    with pytest.raises(ValueError, match="old_ids"):
        cpt.TokenMixer(_ids([3]), _ids([3])[:0], PAD, replay_share=0.1)


# --- vocabulary -----------------------------------------------------------------------------------------------

def test_extend_for_domain_keeps_old_ids_and_rows_and_sets_the_new_rows(lab, domain):
    n_old = len(lab.tokenizer)
    old_rows = lab.model.get_input_embeddings().weight.detach().clone()
    mean = cpt.extend_for_domain(lab, domain, "mean")
    rand = cpt.extend_for_domain(lab, domain, "random", seed=0)
    for ext in (mean, rand):
        assert len(ext.tokenizer) == n_old + len(domain.vocabulary)
        assert ext.tokenizer.get_vocab()["Paris"] == lab.tokenizer.get_vocab()["Paris"]
        w = ext.model.get_input_embeddings().weight
        assert torch.equal(w[:n_old], old_rows)  # old rows untouched
        assert ext.model.lm_head.weight.data_ptr() == w.data_ptr()  # still tied to the output layer
        encode(ext.tokenizer, domain.texts)  # every domain word is now known
    new_mean = mean.model.get_input_embeddings().weight[n_old:]
    assert torch.allclose(new_mean, old_rows.mean(0).expand_as(new_mean), atol=1e-3)
    new_rand = rand.model.get_input_embeddings().weight[n_old:]
    assert abs(new_rand.std().item() - cpt.RANDOM_STD) < 0.005 and new_rand.mean().abs() < 0.005
    assert torch.equal(lab.model.get_input_embeddings().weight, old_rows)  # the lab itself is unchanged


def test_embedding_shift_measures_relative_motion_and_neighbours():
    before = torch.eye(4) + 0.1
    shift = cpt.embedding_shift(before, before.clone())
    assert shift["relative"] == 0 and shift["median_row"] == 0 and shift["neighbours_kept"] == 1
    moved = cpt.embedding_shift(before, 2 * before)
    assert moved["relative"] == pytest.approx(1.0) and moved["neighbours_kept"] == 1  # scaling keeps cosines
    with pytest.raises(ValueError, match="before and after"):
        cpt.embedding_shift(before, before[:3])


def test_probe_split_is_a_seeded_random_partition():
    texts = [f"t{i}" for i in range(40)]
    probe, test = cpt.probe_split(texts, seed=2)
    assert sorted(probe + test) == sorted(texts) and len(probe) == 20 and not set(probe) & set(test)
    assert probe != texts[:20]  # not a prefix
    assert cpt.probe_split(texts, seed=2) == (probe, test)


# --- the run --------------------------------------------------------------------------------------------------

def test_continual_pretrain_learns_the_domain_and_reports_its_curves(lab, domain):
    run = cpt.continual_pretrain(lab, domain, steps=60, batch_tokens=160, replay_share=0.25, peak_lr=1e-2,
                                 eval_every=20, seed=0)
    h = run.history
    assert list(h.step) == [0, 20, 40, 60]
    assert h.new.iloc[0] == 0 and h.new.iloc[-1] > h.new.iloc[0]  # it learns the domain
    probe, test = cpt.probe_split(lab.world.general_test, seed=lab.world.seed)
    start = cpt.extend_for_domain(lab, domain, "random", seed=0)  # step 0 is the extended model, untrained
    assert h.test_ppl.iloc[0] == pytest.approx(lm.perplexity(start.model, start.tokenizer, test), rel=1e-4)
    assert h.probe_ppl.iloc[0] == pytest.approx(lm.perplexity(start.model, start.tokenizer, probe), rel=1e-4)
    assert abs(run.token_share - 0.25) < 0.01 and run.tokens >= 60 * 160 * 0.75
    assert run.old_embeddings["relative"] > 0
    assert h.lr.iloc[-1] == pytest.approx(cpt.lr_at(59, 60, "rewarm", peak_lr=1e-2))
    assert run.lab.model is not lab.model and len(run.lab.tokenizer) > len(lab.tokenizer)


def test_replay_protects_the_old_model(lab, domain):
    kwargs = dict(steps=40, batch_tokens=160, peak_lr=1e-2, eval_every=40, seed=0)
    none = cpt.continual_pretrain(lab, domain, replay_share=0.0, **kwargs).final
    half = cpt.continual_pretrain(lab, domain, replay_share=0.5, **kwargs).final
    assert half.test_ppl < none.test_ppl


def test_zero_learning_rate_changes_nothing(lab, domain):
    run = cpt.continual_pretrain(lab, domain, steps=5, schedule="constant", low_lr=1e-12, eval_every=5,
                                 weight_decay=0.0)
    first, last = run.history.iloc[0], run.history.iloc[-1]
    assert math.isclose(first.test_ppl, last.test_ppl, rel_tol=1e-6) and first.old == last.old


def test_continual_pretrain_rejects_a_lab_without_a_world(lab):
    with pytest.raises(TypeError, match="lab"):
        cpt.continual_pretrain(lm.Lab(lab.model, lab.tokenizer, None, {}))
