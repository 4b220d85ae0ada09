"""Chapter 15's helpers on the SMOKE lab: the PEFT family built with PEFT, counted, trained through ``train.fit``,
timed; OSF's projection with SGD and its leak with Adam; the re-alignment experiment's bookkeeping."""

import math

import pytest
import torch

from cl_lab import lm
from cl_lab.chapters import ch09, ch15

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def stream(lab):
    return ch15.new_people(lab, 4, n_pretrained=50)


@pytest.mark.parametrize("method", ch15.METHODS)
def test_untrained_members_equal_the_pretrained_lm(lab, stream, method):
    """Every member starts as the pretrained LM: LoRA's B = 0, IA³'s vectors = 1, OSF's SVD, full fine-tuning's copy;
    prompt tuning's soft tokens are the one exception, so its untrained logits only have to be finite."""
    x = stream.eval_tasks[0].x_test[:16]
    model = ch15.family_model(lab, method).eval()
    with torch.no_grad():
        got, want = model(x), lab.as_classifier().eval()(x)
    assert got.shape == want.shape
    if method == "prompt tuning":
        assert torch.isfinite(got).all()
    else:
        assert torch.allclose(got, want, atol=1e-4)


def test_only_the_adapter_trains_and_the_lab_is_left_alone(lab, stream):
    before = {n: p.detach().clone() for n, p in lab.model.named_parameters()}
    counts = {m: ch15.trainable(ch15.family_model(lab, m)) for m in ch15.METHODS}
    assert counts["full fine-tuning"] == lab.n_parameters
    assert counts["prompt tuning"] < counts["IA³"] < counts["LoRA"] < counts["full fine-tuning"]
    lora = ch15.family_model(lab, "LoRA", rank=4)
    assert ch15.trainable(lora) == ch15.lora_count(lora, 4)
    null = ch09.null_stream(lab, stream, require_known=False)
    member = ch15.train_member(lab, stream, null, "LoRA", steps=2)
    assert 0 <= member.learned <= 1 and 0 <= member.kept <= 1 and member.trainable == counts["LoRA"]
    assert all(torch.equal(p, before[n]) for n, p in lab.model.named_parameters())


def test_conv1d_to_linear_keeps_the_function(lab, stream):
    import copy

    model = copy.deepcopy(lab.model)
    x = stream.eval_tasks[0].x_test[:8]
    want = lab.as_classifier()(x)
    ch15.conv1d_to_linear(model)
    assert any(isinstance(m, torch.nn.Linear) for m in model.transformer.h[0].modules())
    assert torch.allclose(lm.LMClassifier(model, lab.tokenizer.pad_token_id)(x), want, atol=1e-5)


def test_keep_positions_gives_real_tokens_their_pretraining_positions(lab, stream):
    """With the soft tokens at position 0 the real tokens' logits change only through attention to the soft tokens;
    without it, every real token would move by n_virtual positions."""
    model = ch15.family_model(lab, "prompt tuning", n_virtual=2)
    seen = {}
    inner = model.lm.peft.get_base_model().transformer
    def spy(module, args, kwargs):
        seen["pos"] = kwargs.get("position_ids")  # registered after keep_positions' hook: sees what it set

    inner.register_forward_pre_hook(spy, with_kwargs=True)
    model(stream.eval_tasks[0].x_test[:3])
    pos = seen["pos"][0].tolist()
    assert pos[:2] == [0, 0] and pos[2:] == list(range(len(pos) - 2))


def test_osf_projection_holds_for_sgd_and_leaks_under_adam(lab, stream):
    x, y, _ = stream.tasks[0].sample(16, seed=0)
    sgd = ch15.family_model(lab, "OSF")
    torch.nn.functional.cross_entropy(sgd(x), y).backward()
    torch.optim.SGD([p for p in sgd.parameters() if p.requires_grad], lr=0.1).step()
    assert ch15.osf_leak(sgd) < 1e-3
    adam = ch15.family_model(lab, "OSF")
    opt = torch.optim.Adam([p for p in adam.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(adam(x), y).backward()
        opt.step()
    assert ch15.osf_leak(adam) > 0.01


def test_family_table_and_timing(lab, stream):
    null = ch09.null_stream(lab, stream, require_known=False)
    members = [ch15.train_member(lab, stream, null, m, steps=1) for m in ("full fine-tuning", "IA³")]
    seconds = ch15.step_seconds(lab, stream.tasks[0], methods=("full fine-tuning", "IA³"), steps=1, repeats=1)
    table = ch15.family_table(members, seconds, {"recall": 0.5})
    assert table.loc["full fine-tuning", "step / full"] == 1.0
    assert set(table.index) == {"full fine-tuning", "IA³"}
    ch15.plot_family(table, {"recall": 0.5})


def test_split_people_never_scores_a_realignment_fact(lab):
    task = lm.fact_stream(lab, 1, "subjects", n_subjects=4).tasks[0]
    realign, scored = ch15.split_people(task, 1, seed=3)
    assert {f.subject for f in realign}.isdisjoint({f.subject for f in scored})
    assert len(realign) + len(scored) == len(task.train_facts)
    with pytest.raises(ValueError, match="n_realign"):
        ch15.split_people(task, 4)


def test_realignment_shares():
    r = ch15.Realignment(1.0, 0.2, 0.6, 0.0, 0.1, 1.0, 0.8)
    assert r.recovered == pytest.approx(0.5) and r.beyond_null == pytest.approx(0.3)
    assert math.isnan(ch15.Realignment(0.5, 0.5, 0.5, 0, 0, 1, 1).recovered)  # nothing lost: no share


def test_realignment_runs_on_the_smoke_lab(lab):
    r = ch15.realignment(lab, n_people=4, n_realign=1, steps=1, realign_steps=1)
    assert all(0 <= v <= 1 for v in vars(r).values())
    ch15.plot_realignment(r)


def test_family_point_is_cached():
    a = ch15.family_point("IA³", 1, 0, True)
    assert ch15.family_point("IA³", 1, 0, True) is a
    ch15.plot_family_point(a)


def test_the_diagram_names_every_member_where_it_trains():
    import matplotlib.pyplot as plt

    from cl_lab.diagrams import ch15 as diagram

    fig = diagram.peft_family(rank=4, n_virtual=3)
    ax = fig.axes[0]
    text = " ".join(t.get_text() for t in ax.texts + [ax.title])
    for piece in (*ch15.METHODS, "rank 4", "3 soft tokens, [3, d]", "orthogonal to the top ones", "c_attn"):
        assert piece in text
    boxes = [p for p in ax.patches if type(p).__name__ == "FancyBboxPatch"]
    assert len(boxes) == 4 + 2 * len(ch15.METHODS)  # the block's four stages, a name and a note per method
    fig.canvas.draw()
    plt.close(fig)
