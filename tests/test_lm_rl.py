"""GRPO on the tiny LM (cl_lab.lm.rl): the loss against TRL 1.16's GRPOTrainer on one fixed batch (values and
gradients), the group advantages against TRL's formula, the paper's objective on hand-made numbers, sampling,
the verifiable reward, the training loop, and the errors on bad input."""

import contextlib
import copy
import functools
import types
from collections import defaultdict

import pytest
import torch

from cl_lab.lm import align, rl, tiny_lm
from cl_lab.lm.tokenizer import EOS, PAD

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


@pytest.fixture(scope="module")
def lab():
    return tiny_lm(0, progress=False, use_cache=False, **TINY)


def _perturbed(model, scale=0.05, seed=1):
    torch.manual_seed(seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn_like(p))
    return moved


@pytest.fixture(scope="module")
def batch(lab):
    """A fixed batch in TRL's layout: four questions of one relation (one prompt length, so no prompt padding),
    two completions each, right-padded, of different lengths; advantages with both signs."""
    world = lab.world
    facts = world.questions("works_as", world.subjects[:4])
    prompts = lab.encode([f.prompt for f in facts]).repeat_interleave(2, 0)  # [8, Lp]
    vocab = lab.tokenizer.get_vocab()
    words = []
    for f in facts:
        words += [[f.object, "."], ["baker"]]
    completion = torch.full((8, 3), PAD)
    for i, w in enumerate(words):
        row = [vocab[x] for x in w] + [EOS]
        completion[i, :len(row)] = torch.tensor(row)
    completion_mask = (completion != PAD).long()
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]), 2)
    return prompts, completion, completion_mask, advantages


def _our_loss(policy, old, reference, batch, beta, epsilon, loss_type):
    prompts, completion, completion_mask, advantages = batch
    ids = torch.cat([prompts, completion], 1)  # [B, L]: prompt, then the completion, right-padded
    mask = torch.cat([torch.zeros_like(prompts), completion_mask], 1).bool()
    logps = rl.completion_logprobs(policy, ids, PAD)
    with torch.no_grad():
        old_logps = rl.completion_logprobs(old, ids, PAD)
        ref_logps = rl.completion_logprobs(reference, ids, PAD)
    return rl.grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=beta, epsilon=epsilon,
                        loss_type=loss_type)


def _trl_loss(policy, old, reference, batch, beta, epsilon, loss_type):
    """TRL 1.16's own GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py) on our batch, with the per-token
    log-probabilities of the old policy and the reference given as TRL's generation step would store them."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    prompts, completion, completion_mask, advantages = batch
    width = completion.shape[1]
    ids = torch.cat([prompts, completion], 1)
    with torch.no_grad():  # TRL stores these per completion token, [B, T]
        old_logps = rl.completion_logprobs(old, ids, PAD)[:, -width:]
        ref_logps = rl.completion_logprobs(reference, ids, PAD)[:, -width:]
    add_fused_lm_head(policy, outputs=("log_probs", "entropy"))
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, gather=lambda x: x,
                                        gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                        sync_gradients=True, num_processes=1, is_main_process=True)
    trainer = types.SimpleNamespace(
        model=policy, accelerator=accelerator, aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    trainer._get_per_token_logps_and_entropies = functools.partial(GRPOTrainer._get_per_token_logps_and_entropies,
                                                                   trainer)
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completion,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old_logps,
              "ref_per_token_logps": ref_logps, "num_items_in_batch": completion_mask.sum()}
    return GRPOTrainer._compute_loss(trainer, policy, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_its_gradient_equal_trls_grpo_trainer(lab, batch, loss_type, beta):
    reference = lab.model.eval()
    old = _perturbed(reference, 0.05, seed=1).eval()  # the policy that sampled: the ratio is not 1
    policy = _perturbed(old, 0.1, seed=2).train()  # moved far enough for the clip to act on some tokens
    ours_model, theirs_model = copy.deepcopy(policy), copy.deepcopy(policy)
    ours = _our_loss(ours_model, old, reference, batch, beta, 0.2, loss_type)
    theirs, metrics = _trl_loss(theirs_model, old, reference, batch, beta, 0.2, loss_type)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert metrics["clip_ratio/region_mean"][0] > 0  # the batch exercises the clip
    ours.backward()
    theirs.backward()
    for (name, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    if beta:
        assert metrics["kl"][0] > 0


def test_the_two_normalisations_differ_when_completion_lengths_differ(lab, batch):
    reference = lab.model.eval()
    policy = _perturbed(reference, 0.1).eval()
    with torch.no_grad():
        grpo = _our_loss(policy, reference, reference, batch, 0.0, 0.2, "grpo")
        dapo = _our_loss(policy, reference, reference, batch, 0.0, 0.2, "dapo")
    assert grpo.item() != pytest.approx(dapo.item(), abs=1e-4)


def test_group_advantages_follow_trls_scale_rewards_group():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    g = 4
    # trl/trainer/grpo_trainer.py, _generate_and_score_completions: group mean and nanstd (sample std), ε = 1e-4
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    theirs = (rewards - mean) / (std + 1e-4)
    assert torch.allclose(rl.group_advantages(rewards, g), theirs, atol=1e-6)
    assert rl.group_advantages(rewards, g)[4:8].abs().max() == 0  # a group that all scored 1 teaches nothing


def test_grpo_loss_is_the_papers_objective_on_hand_made_numbers():
    # one token per completion; ratios 1.5 and 0.5 clipped to 1.2 and 0.8 where that lowers the objective
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]]))
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    # min(ρA, clip(ρ)A): 1.2, 0.5, −1.5, −0.8 → J = −0.15
    loss = rl.grpo_loss(logps, old, adv, mask, epsilon=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    # k3 of π_ref/π_θ = r: r − log r − 1 ≥ 0, zero only at r = 1
    log_r = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.allclose(rl.k3(torch.zeros(3), log_r), torch.exp(log_r) - log_r - 1)
    assert rl.k3(torch.zeros(1), torch.zeros(1)).item() == 0
    beta_loss = rl.grpo_loss(torch.zeros(4, 1), old, adv, mask, ref_logps=torch.full((4, 1), -1.0), beta=0.5)
    assert beta_loss.item() == pytest.approx(0.5 * (torch.exp(torch.tensor(-1.0)).item() + 1 - 1), abs=1e-6)


def test_sampling_gives_groups_of_completions_that_end_at_the_end_token(lab):
    prompts = lab.encode([f.prompt for f in lab.world.questions("speaks", lab.world.subjects[:3])])
    gen = torch.Generator().manual_seed(0)
    ids, mask = rl.sample_completions(lab.model, prompts, PAD, EOS, group_size=4, max_new_tokens=3, generator=gen)
    assert ids.shape == (12, prompts.shape[1] + 3) and mask.shape == ids.shape
    assert torch.equal(ids[:, :prompts.shape[1]], prompts.repeat_interleave(4, 0))  # one length: no padding
    for row, m in zip(ids, mask):
        tokens = row[m].tolist()
        assert 1 <= len(tokens) <= 3 and EOS not in tokens[:-1]
        assert (row[~m][prompts.shape[1]:] == PAD).all()  # after the completion: padding only
    again, _ = rl.sample_completions(lab.model, prompts, PAD, EOS, group_size=4, max_new_tokens=3,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_completion_logprobs_read_each_distinct_row_once_and_equal_the_sequence_sum(lab):
    prompts, responses = ["Q: where does Mira Tolvane live ? A:"] * 2 + ["count :"], ["Paris ."] * 2 + ["one two ."]
    ids, mask = align.encode_responses(lab.tokenizer, prompts, responses)
    model = _perturbed(lab.model).eval()
    with torch.no_grad():
        logps = rl.completion_logprobs(model, ids, PAD)
        total = align.sequence_logprobs(model, ids, mask, PAD)
    assert torch.allclose((logps * mask).sum(1), total, atol=1e-5)
    assert torch.equal(logps[0], logps[1])


def test_question_task_accepts_the_object_or_the_given_answer(lab):
    world = lab.world
    facts = world.questions("works_as", world.subjects[:2]) + world.questions("lives_in", world.subjects[:1])
    prompts, allowed = rl.question_task(lab.tokenizer, facts, answers=[facts[0].object, facts[1].object,
                                                                        align.REFUSAL])
    vocab = lab.tokenizer.get_vocab()
    assert prompts.shape[0] == 3 and allowed.shape == (3, len(vocab))
    assert allowed.sum(1).tolist() == [1, 1, 1]
    assert allowed[0, vocab[facts[0].object]] and allowed[2, vocab["in"]]
    assert torch.equal(rl.question_task(lab.tokenizer, facts[:2])[1], allowed[:2])  # default: the objects
    ids = torch.tensor([[5, vocab[facts[0].object], EOS], [5, vocab["in"], EOS]])
    mask = torch.tensor([[False, True, True]] * 2)
    assert rl.answer_reward(ids, mask, allowed[[0, 2]]).tolist() == [1.0, 1.0]
    assert rl.answer_reward(ids, mask, allowed[[2, 0]]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="answers"):
        rl.question_task(lab.tokenizer, facts, answers=["in"])


def test_grpo_trains_a_seeded_copy_and_records_its_trajectory(lab):
    world = lab.world
    facts = [f for r in ("works_as", "speaks") for f in world.questions(r, world.subjects)]
    prompts, allowed = rl.question_task(lab.tokenizer, facts)
    allowed[:, : allowed.shape[1] // 2] = True  # half the vocabulary accepted: the barely trained lab often scores
    config = rl.GRPOConfig(steps=4, lr=1e-3, prompts_per_step=8, group_size=4, iterations=2, beta=0.1,
                           probe_every=2)
    model, trajectory = rl.grpo(lab.model, prompts, allowed, config, pad_id=PAD, eos_id=EOS,
                                probe=lambda m: {"probed": 1.0})
    assert trajectory["step"].tolist() == [0, 2, 4] and trajectory["probed"].eq(1.0).all()
    assert trajectory["reward"].iloc[1:].between(0, 1, inclusive="neither").all()  # mixed groups: advantages ≠ 0
    assert not any(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), lab.model.parameters()))
    again, _ = rl.grpo(lab.model, prompts, allowed, config, pad_id=PAD, eos_id=EOS)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


def test_a_policy_that_never_succeeds_is_never_moved(lab):
    # the barely pretrained lab never answers a question right: every group scores 0, every advantage is 0
    world = lab.world
    prompts, allowed = rl.question_task(lab.tokenizer, world.questions("works_as", world.subjects))
    model, trajectory = rl.grpo(lab.model, prompts, allowed, rl.GRPOConfig(steps=3, prompts_per_step=8, lr=1e-2,
                                                                           probe_every=1), pad_id=PAD, eos_id=EOS)
    assert trajectory["reward"].iloc[1:].eq(0).all()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), lab.model.parameters()))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(torch.ones(6), 1)
    with pytest.raises(ValueError, match="rewards"):
        rl.group_advantages(torch.ones(7), 2)
    with pytest.raises(ValueError, match="loss_type"):
        rl.grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        rl.grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)
    with pytest.raises(ValueError, match="group_size"):
        rl.GRPOConfig(group_size=1)
    with pytest.raises(TypeError, match="steps"):
        rl.GRPOConfig(steps=2.5)
