"""Exercises of chapters 05–08: every solution passes its checker, every stub fails it, and each listed wrong answer
fails on the property written down here (the case that separates it from the right answer).
(The contract every exercise keeps is in test_exercises_contract.py.)"""


import pytest

from cl_lab import exercises

CHAPTERS = ("05", "06", "07", "08")
OURS = [e for e in exercises.all() if e.chapter in CHAPTERS]

# (exercise, wrong answer) -> a piece of the property that must catch it
CAUGHT_BY = {
    ("agem_projection", "projects even without a conflict"): "with no conflict",
    ("agem_projection", "divides by ‖g_ref‖, not ‖g_ref‖²"): "lands on the boundary",
    ("agem_projection", "adds the component instead of removing it"): "⟨g̃, g_ref⟩ ≥ 0",
    ("gem_two_constraints", "A-GEM on the mean of the two"): "for EVERY old task",
    ("gem_two_constraints", "one constraint after the other"): "no feasible vector is closer",
    ("gem_two_constraints", "both planes whenever there is a conflict"): "no feasible vector is closer",
    ("packnet_prune", "prunes the smallest weights of every task"): "masks stay disjoint",
    ("packnet_prune", "frees the largest weights"): "frees the smallest |w|",
    ("packnet_prune", "prune_ratio of the whole layer, not of the task's weights"): "keep their owner",
    ("progressive_forward", "the head ignores the laterals"): "equals ProgressiveNet's forward",
    ("progressive_forward", "relu before adding the laterals"): "equals ProgressiveNet's forward (hidden (6, 4)",
    ("progressive_forward", "laterals from the previous column only"): "3 columns, task 2",
    ("weight_align", "rescales the old rows instead of the new ones"): "stay exactly as they were",
    ("weight_align", "leaves the new biases alone"): "new biases are scaled",
    ("weight_align", "scales each new row to the old mean norm"): "one γ for every new row",
    ("bic_correction", "corrects every class"): "columns of the old classes",
    ("bic_correction", "corrects the old classes"): "columns of the old classes",
    ("bic_correction", "edits the logits in place"): "leaves the input logits unchanged",
    ("min_acc", "includes n = t_j"): "excludes n = t_j",
    ("min_acc", "minimum over the whole curve"): "before the task was learnt",
    ("min_acc", "later task ends only (what R sees)"): "sees the dip between task ends",
    ("wc_acc", "Min-ACC over the whole run, not up to t_k"): "only evaluations up to t_k count",
    ("wc_acc", "the newest task at the end of the run"): "after the first task",
    ("wc_acc", "weights ½ and ½"): "with flat curves",
}


def test_each_chapter_has_at_least_two_exercises_with_a_checker():
    for chapter in CHAPTERS:
        mine = [e for e in OURS if e.chapter == chapter]
        assert len(mine) >= 2, f"chapter {chapter} has {len(mine)} exercises"
        for e in mine:
            assert callable(getattr(exercises, f"check_{e.name}")), e.name
            assert 1 <= e.difficulty <= 3 and e.minutes > 0 and e.wrong_answers


@pytest.mark.parametrize("exercise, wrong", [(e, w) for e in OURS for w in e.wrong_answers],
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_wrong_answer_fails_on_the_property_that_separates_it(exercise, wrong):
    with pytest.raises(AssertionError) as failure:
        exercise.check(exercise.wrong_answers[wrong], strict=True)
    message = str(failure.value)
    assert message.startswith(f"{exercise.name}: ") and "raised" not in message, message
    assert CAUGHT_BY[exercise.name, wrong] in message, message


def test_every_wrong_answer_is_listed_here():
    assert {(e.name, w) for e in OURS for w in e.wrong_answers} == set(CAUGHT_BY)


def test_in_a_notebook_a_wrong_answer_prints_and_does_not_raise(capsys):
    exercise = next(e for e in OURS if e.name == "agem_projection")
    assert exercise.check(next(iter(exercise.wrong_answers.values()))) is False
    assert "with no conflict" in capsys.readouterr().out
    assert exercise.check(exercise.stub) is False
    assert "not attempted yet" in capsys.readouterr().out
