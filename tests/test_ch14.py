"""Chapter 14 helpers, on the 1-layer SMOKE lab: the chain and its capability matrix, the RL stage's task and the
verifier, the razor's probe, runs and matched-accuracy table, and the figures."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cl_lab.chapters import ch14  # noqa: E402
from cl_lab.lm import SMOKE_CONFIG, align, rl  # noqa: E402


@pytest.fixture(scope="module")
def chain():
    return ch14.chain(0, sft_steps=3, dpo_steps=2, lab_config=SMOKE_CONFIG)


def test_the_chain_holds_three_stages_and_the_cache_returns_it(chain):
    assert list(chain.rows) == ["base", "SFT", "DPO"]
    assert set(align.COLUMNS) <= set(chain.rows["DPO"])
    assert ch14.chain(0, sft_steps=3, dpo_steps=2, lab_config=SMOKE_CONFIG) is chain
    held = set(chain.holdout.subjects)
    assert held <= set(chain.data.heldout_subjects) and not held & set(chain.data.sft_subjects)


def test_the_rl_task_asks_the_sft_people_and_the_verifier_adds_their_private_questions(chain):
    facts = ch14.rl_facts(chain)
    assert {f.relation for f in facts} == set(ch14.ANSWERED)
    assert {f.subject for f in facts} == set(chain.data.sft_subjects)
    prompts, allowed = ch14.rl_task(chain)
    assert len(prompts) == len(facts) and allowed.sum(1).eq(1).all()
    checked = ch14.rl_facts(chain, verifier=True)
    private = [i for i, f in enumerate(checked) if f.relation == align.PRIVATE_RELATION]
    assert len(private) == len(chain.data.sft_subjects)
    _, allowed = ch14.rl_task(chain, verifier=True)
    refusal = chain.lab.tokenizer.get_vocab()[align.REFUSAL.split()[0]]
    assert allowed[private, refusal].all() and allowed[private].sum(1).eq(1).all()


def test_rl_stage_and_the_capability_matrix(chain):
    model, trajectory = ch14.run_rl(chain, rl.GRPOConfig(steps=2, prompts_per_step=8, group_size=2, probe_every=1))
    assert trajectory.step.tolist() == [0, 1, 2] and "win rate" in trajectory
    R = ch14.capability_matrix(chain, {"RL": model})
    assert list(R.index) == ["base", "SFT", "DPO", "RL"]
    assert R.loc["DPO", "recall"] == chain.rows["DPO"]["recall"]
    fig = ch14.plot_capability_matrix(R)
    assert len(fig.axes) == 2
    plt.close(fig)
    reward = ch14.sampled_reward(chain, chain.sft_model, n_prompts=4, group_size=2)
    assert 0 <= reward <= 1
    assert reward == ch14.sampled_reward(chain, chain.sft_model, n_prompts=4, group_size=2)  # seeded


def test_razor_runs_probe_every_method_and_match_on_accuracy(chain):
    task = ch14.razor_task(chain, require_known=False)
    assert not {f.subject for f in task.facts} & set(chain.holdout.subjects)
    at_start = task.probe(task.start)
    assert at_start["KL(start‖model)"] == pytest.approx(0, abs=1e-6)
    assert at_start["KL(model‖start)"] == pytest.approx(0, abs=1e-6)
    runs = ch14.razor_runs(task, sft_lrs=(1e-3,), rl_lrs=(1e-3,), null_lrs=(1e-3,), steps=2, probe_every=1)
    assert runs.groupby("method").size().to_dict() == {"SFT": 3, "RL": 3, "null": 3}
    assert runs.loc[runs.step == 0, "forgetting"].abs().max() == 0
    moved = runs[(runs.method == "SFT") & (runs.step == 2)].iloc[0]
    assert moved["KL(start‖model)"] > 0 and moved["KL(model‖start)"] > 0
    table = ch14.at_accuracy(runs, 0.0)  # every run is at ≥ 0 from its start
    assert list(table.index) == ["SFT, lr 0.001", "RL, lr 0.001"] and (table.step == 0).all()
    never = ch14.at_accuracy(runs, 1.5)
    assert never["forgetting"].isna().all()
    fig = ch14.plot_razor(runs)
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 3 + 1  # three runs and the zero line
    plt.close(fig)


def test_the_razor_probe_reads_the_start_as_zero_kl_and_a_moved_model_as_positive(chain):
    task = ch14.razor_task(chain, require_known=False)
    moved = pd.DataFrame([task.probe(chain.dpo_model)])
    assert (moved[["KL(start‖model)", "KL(model‖start)"]] > 0).all(axis=None)
    assert torch.equal(task.probe.targets, task.allowed.float().argmax(1))
