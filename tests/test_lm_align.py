"""Post-training the tiny LM (cl_lab.lm.align): sequence log-probabilities, DPO against TRL, the remedies, weight
averaging, matched strength, the probe, Schulman's KL estimators, and the errors on bad input."""

import copy
import math
import types
from collections import defaultdict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cl_lab.lm import align, kl_estimators, nulls, tiny_lm
from cl_lab.lm.world import RELATIONS
from cl_lab.methods.alignment import dpo_loss

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


@pytest.fixture(scope="module")
def lab():
    return tiny_lm(0, progress=False, use_cache=False, **TINY)


@pytest.fixture(scope="module")
def data(lab):
    return align.alignment_data(lab.world, n_sft_subjects=10, seed=0)


def _perturbed(model, scale=0.05, seed=1):
    torch.manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn_like(p))
    return moved


# --- the data and the sequences ------------------------------------------------------------------------------

def test_alignment_data_splits_people_and_builds_the_pairs(lab, data):
    assert not set(data.sft_subjects) & set(data.heldout_subjects)
    assert len(data.sft_subjects) + len(data.heldout_subjects) == lab.world.n_subjects
    private = [p for p in data.pairs if p.chosen == align.REFUSAL]
    assert len(private) == len(data.sft_subjects)
    for pair in private:  # the rejected response names the person's real city
        subject = next(s for s in data.sft_subjects if s in pair.prompt)
        assert pair.rejected == f"{lab.world.knowledge[(subject, align.PRIVATE_RELATION)]} ."
    helpful = [p for p in data.pairs if p.rejected == align.REFUSAL]  # the other relations: answer, do not refuse
    assert len(helpful) == 3 * len(data.sft_subjects)
    assert all(f.relation != align.PRIVATE_RELATION and f.subject in data.heldout_subjects
               for f in data.instruction_facts)
    assert all(p.prompt.startswith("Q: where does") for p in data.heldout_pairs)
    assert align.alignment_data(lab.world, n_sft_subjects=10, seed=1).sft_subjects != data.sft_subjects


def test_response_mask_covers_the_response_and_the_end_token_only(lab):
    ids, mask = align.encode_responses(lab.tokenizer, ["Q: where does Mira Tolvane live ? A:"], ["in a city ."])
    tokens = lab.tokenizer.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert tokens == ["in", "a", "city", ".", "<eos>"]


def test_sequence_logprobs_equal_a_token_by_token_sum(lab):
    model = _perturbed(lab.model).eval()
    prompts, responses = ["Q: where does Mira Tolvane live ? A:", "count :"], ["Paris .", "one two three ."]
    ids, mask = align.encode_responses(lab.tokenizer, prompts, responses)
    got = align.sequence_logprobs(model, ids, mask, lab.tokenizer.pad_token_id)
    for row in range(len(prompts)):
        total = 0.0
        for t in mask[row].nonzero().flatten().tolist():  # one forward pass per prefix
            with torch.no_grad():
                logits = model(input_ids=ids[row:row + 1, :t]).logits[0, -1]
            total += logits.log_softmax(-1)[ids[row, t]].item()
        assert got[row].item() == pytest.approx(total, abs=1e-4)


# --- DPO ---------------------------------------------------------------------------------------------------

def test_dpo_loss_is_the_papers_formula_on_hand_made_numbers():
    # eq. 7: −log σ(β[(log π_w − log π_ref,w) − (log π_l − log π_ref,l)]); margin (−3 + 5) − (−9 + 6) = 5
    loss = dpo_loss(torch.tensor([-3.0]), torch.tensor([-9.0]), torch.tensor([-5.0]), torch.tensor([-6.0]), 0.2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)
    same = torch.tensor([-4.0, -7.5])
    assert dpo_loss(same, same - 2, same, same - 2, 0.1).item() == pytest.approx(math.log(2))


def _trl_dpo_loss(policy, reference, encoded, beta):
    """TRL's own DPOTrainer._compute_loss (sigmoid loss, reference computed on the fly) on our batch."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    ids = torch.cat([encoded.chosen, encoded.rejected])  # TRL's batch: chosen rows, then rejected rows
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(),
              "completion_mask": torch.cat([encoded.chosen_mask, encoded.rejected_mask]).long()}
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                        gather=lambda x: x, unwrap_model=lambda m: m)
    trainer = types.SimpleNamespace(
        model=policy, ref_model=reference, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=False, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, False)
    mode = "train" if policy.training else "eval"
    return loss.item(), trainer._metrics[mode]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_on_sequences_equals_trls(lab, data, beta):
    reference = lab.model.eval()
    policy = _perturbed(reference).eval()
    encoded = align.encode_pairs(lab.tokenizer, data.pairs[:4] + data.pairs[-4:])  # private and helpful pairs
    chosen, rejected = encoded.logprobs(policy, 0)
    ref_chosen, ref_rejected = encoded.logprobs(reference, 0)
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta).item()
    theirs, metrics = _trl_dpo_loss(policy, reference, encoded, beta)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert chosen.mean().item() == pytest.approx(metrics["logps/chosen"][0], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(metrics["logps/rejected"][0], abs=1e-4)
    assert ours != pytest.approx(math.log(2), abs=1e-3)  # the perturbation moved the policy


def test_dpo_raises_the_training_pairs_margin_and_records_its_trajectory(lab, data):
    probe = align.Probe(lab, data, lab.model, n_facts=40, n_texts=10)
    config = align.DPOConfig(steps=6, lr=1e-3, batch_size=8, probe_every=3)
    model, trajectory = align.dpo(lab, lab.model, data.pairs, config, probe)
    assert trajectory["step"].tolist() == [0, 3, 6]
    assert trajectory.loc[0, "margin"] == pytest.approx(0.0, abs=1e-4)  # the reference's own margin
    encoded = align.encode_pairs(lab.tokenizer, data.pairs)
    before = [x.sum().item() for x in encoded.logprobs(lab.model, 0)]
    after = [x.sum().item() for x in encoded.logprobs(model, 0)]
    assert after[0] - after[1] > before[0] - before[1]  # chosen gained on rejected
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_only_dpo_changes_only_the_adapted_projections_and_ignores_the_global_seed(lab, data):
    config = align.DPOConfig(steps=3, batch_size=8, lora_rank=2, replay_share=0.2)
    torch.manual_seed(1)
    model, _ = align.dpo(lab, lab.model, data.pairs, config)
    torch.manual_seed(2)
    again, _ = align.dpo(lab, lab.model, data.pairs, config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    before, after = lab.model.state_dict(), model.state_dict()
    assert before.keys() == after.keys()  # merged back into plain GPT-2 weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".weight") and k.split(".")[-2] in align.LORA_TARGETS for k in changed)


def test_replay_keeps_its_token_share(lab, data):
    probe = align.Probe(lab, data, lab.model, n_facts=20, n_texts=5)
    config = align.DPOConfig(steps=8, batch_size=8, replay_share=0.25, probe_every=8)
    _, trajectory = align.dpo(lab, lab.model, data.pairs, config, probe)
    assert trajectory["replayed share"].iloc[-1] == pytest.approx(0.25, abs=0.03)


def test_kl_on_texts_is_zero_with_zero_gradient_at_the_reference_and_positive_away(lab):
    ids = lab.encode(lab.world.general_test[:6])
    model = copy.deepcopy(lab.model)
    kl = align.kl_on_texts(model, lab.model, ids, 0)
    kl.backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-5
    assert align.kl_on_texts(_perturbed(lab.model), lab.model, ids, 0).item() > 1e-3


# --- averaging and matched strength ----------------------------------------------------------------------------

def test_interpolate_walks_the_straight_line(lab):
    after = _perturbed(lab.model)
    a, b = lab.model.state_dict(), after.state_dict()
    for alpha in (0.0, 0.3, 1.0):
        mid = align.interpolate(lab.model, after, alpha).state_dict()
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(mid[k], (1 - alpha) * a[k] + alpha * b[k], atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        align.interpolate(lab.model, after, 1.5)
    other = tiny_lm(0, progress=False, use_cache=False, **{**TINY, "n_embd": 16, "steps": 1}).model
    with pytest.raises(ValueError, match="state dicts"):
        align.interpolate(lab.model, other, 0.5)


def test_at_strength_interpolates_at_the_first_crossing():
    path = pd.DataFrame({"step": [0, 10, 20, 30], "win rate": [0.0, 0.4, 0.8, 0.6], "recall": [0.9, 0.7, 0.5, 0.6]})
    row = align.at_strength(path, 0.6)
    assert row["step"] == pytest.approx(15) and row["recall"] == pytest.approx(0.6)
    assert align.at_strength(path, 0.0)["recall"] == pytest.approx(0.9)
    assert align.at_strength(path, 0.9).isna().all()


# --- the probe ---------------------------------------------------------------------------------------------

def test_probe_counts_what_it_says(lab, data):
    probe = align.Probe(lab, data, lab.model, n_facts=40, n_texts=10)
    row = probe(lab.model)
    assert set(align.COLUMNS) <= set(row)
    assert row["margin"] == pytest.approx(0.0, abs=1e-4)
    chosen, rejected = align.encode_pairs(lab.tokenizer, data.heldout_pairs).logprobs(lab.model, 0)
    assert row["win rate"] == pytest.approx((chosen > rejected).float().mean().item())
    x, y = probe.x[probe.slices["instruction"]], probe.y[probe.slices["instruction"]]
    with torch.no_grad():
        top = lab.as_classifier()(x).argmax(1)
    objects = [{lab.tokenizer.convert_tokens_to_ids(o) for o in RELATIONS[f.relation].objects}
               for f in data.instruction_facts]
    assert row["instruction"] == pytest.approx((top == y).float().mean().item())
    assert row["format"] == pytest.approx(sum(t in ok for t, ok in zip(top.tolist(), objects)) / len(objects))


def test_probe_scores_unseen_facts_apart_from_the_seen_ones(lab, data):
    held = nulls.hold_out(lab.world, 4, seed=0, among=data.heldout_subjects)
    seen = [f for f in lab.world.train_facts if f.subject not in held.subjects]
    probe = align.Probe(lab, data, lab.model, n_facts=30, n_texts=5, seen=seen, unseen=held.facts,
                        unseen_paraphrases=held.paraphrases)
    row = probe(lab.model)
    assert set(align.UNSEEN_COLUMNS) <= set(row)
    for column, pool in (("recall", seen), ("unseen recall", held.facts), ("unseen paraphrase", held.paraphrases)):
        x, y = probe.x[probe.slices[column]], probe.y[probe.slices[column]]
        prompts = {f.prompt for f in pool}
        assert {lab.tokenizer.decode(ids[ids != 0][1:]) for ids in x} <= prompts
        with torch.no_grad():
            assert row[column] == pytest.approx((lab.as_classifier()(x).argmax(1) == y).float().mean().item())
    assert not set(align.UNSEEN_COLUMNS) & set(align.Probe(lab, data, lab.model, n_facts=10, n_texts=5)(lab.model))


def test_remedies_draw_only_from_the_texts_they_are_given(lab, data, monkeypatch):
    drawn = []
    real_loss = align.lm_loss

    def spy(model, ids, pad_id, reduction="mean"):
        drawn.append(ids)
        return real_loss(model, ids, pad_id, reduction)

    monkeypatch.setattr(align, "lm_loss", spy)
    texts = lab.world.general_train[:5]
    align.dpo(lab, lab.model, data.pairs, align.DPOConfig(steps=3, batch_size=8, replay_share=0.5), texts=texts)
    allowed = {tuple(row[row != 0].tolist()) for row in lab.encode(texts)}
    replayed = {tuple(row[row != 0].tolist())[:-1] for ids in drawn for row in ids}  # without the end token
    assert drawn and replayed <= allowed
    with pytest.raises(ValueError, match="texts"):
        align.dpo(lab, lab.model, data.pairs, align.DPOConfig(steps=1, replay_share=0.5), texts=[])


def test_optimizer_null_trains_known_facts_with_the_stages_optimizer(lab, data):
    facts = lab.world.train_facts[:24]
    probe = align.Probe(lab, data, lab.model, n_facts=20, n_texts=5)
    model, path = align.optimizer_null(lab, lab.model, facts, steps=4, lr=1e-3, batch_size=8, probe=probe,
                                       probe_every=2)
    assert path["step"].tolist() == [0, 2, 4] and path.loc[0, "recall"] == probe(lab.model)["recall"]
    assert not any(p.requires_grad for p in model.parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), lab.model.parameters()))
    assert 0 < moved <= 4 * 1e-3 * 1.01  # AdamW moves a weight by at most about lr a step (no weight decay)
    again, _ = align.optimizer_null(lab, lab.model, facts, steps=4, lr=1e-3, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# --- KL estimators ----------------------------------------------------------------------------------------

def test_kl_estimators_k1_k3_unbiased_k2_biased_k3_non_negative():  # cl_lab.lm.kl_estimators
    torch.manual_seed(0)
    policy, reference = torch.randn(50, 12) * 2, torch.randn(50, 12) * 2  # far apart: KL of about 2 nats
    estimates = kl_estimators.kl_estimates(policy, reference, n_samples=4000, seed=0)
    exact = F.kl_div(reference.double().log_softmax(-1), policy.double().log_softmax(-1), log_target=True,
                     reduction="none").sum(-1)
    assert torch.allclose(estimates["exact"], exact)
    table = kl_estimators.estimator_table(estimates)
    for name in ("k1", "k3"):
        assert abs(table.loc[name, "bias"]) < 4 * table.loc[name, "bias s.e."]
    assert abs(table.loc["k2", "bias"]) > 20 * table.loc["k2", "bias s.e."]
    assert table.loc["k3", "negative"] == 0 and table.loc["k1", "negative"] > 0.1
    near = kl_estimators.kl_estimates(reference + 0.05 * torch.randn(50, 12), reference, n_samples=4000, seed=1)
    small = kl_estimators.estimator_table(near)  # close: k2 nearly unbiased, k3's spread far below k1's
    assert abs(small.loc["k2", "bias"]) < 0.05 * small.loc["k2", "exact KL"]
    assert small.loc["k3", "std"] < 0.2 * small.loc["k1", "std"]


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        align.DPOConfig(beta=beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_pairs_with_an_empty_text_are_refused_by_name(lab, field):
    good = align.Pair("Q: where does Mira Tolvane live ? A:", "in a city .", "Paris .")
    bad = align.Pair(**{**good.__dict__, field: "  "})
    with pytest.raises(ValueError, match=rf"pairs\[1\]\.{field} must be a non-empty text"):
        align.encode_pairs(lab.tokenizer, [good, bad])
    with pytest.raises(ValueError, match=rf"pairs\[1\]\.{field}"):
        align.dpo(lab, lab.model, [good, bad], align.DPOConfig(steps=1, batch_size=1))


def test_other_bad_input_names_the_argument(lab):
    with pytest.raises(ValueError, match="pairs must hold"):
        align.check_pairs([])
    with pytest.raises(ValueError, match=r"responses\[0\] must be a non-empty"):
        align.encode_responses(lab.tokenizer, ["count :"], [""])
    for kwargs, name in (({"replay_share": 1.0}, "replay_share"), ({"kl_coef": -1.0}, "kl_coef"),
                         ({"lora_rank": -1}, "lora_rank"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=name):
            align.DPOConfig(**kwargs)
    with pytest.raises(ValueError, match="n_sft_subjects"):
        align.alignment_data(lab.world, n_sft_subjects=lab.world.n_subjects)
    with pytest.raises(ValueError, match="n_samples"):
        kl_estimators.kl_estimates(torch.zeros(2, 3), torch.zeros(2, 3), n_samples=0)
