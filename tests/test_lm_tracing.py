"""Causal tracing with hooks: no corruption means no effect, restoring everything gives the clean run back, the
hooks leave the model as it was, batching changes nothing, and bad input is refused by name."""

import pytest
import torch

from cl_lab import lm
from cl_lab.lm import tiny_lm, tracing

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


@pytest.fixture(scope="module")
def lab():
    return tiny_lm(0, progress=False, use_cache=False, **TINY)


@pytest.fixture(scope="module")
def facts(lab):
    return lab.world.train_facts[:6]


def _args(facts):
    return [f.prompt for f in facts], [f.subject for f in facts], [f.object for f in facts]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_without_noise_every_indirect_effect_is_zero(lab, facts):
    for site in tracing.SITES:
        trace = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=0.0, site=site, samples=2)
        assert torch.allclose(trace.p_corrupt, trace.p_clean, atol=1e-6)
        effect = trace.effect[~trace.effect.isnan()]
        assert effect.numel() > 0 and effect.abs().max() < 1e-5


def test_restoring_the_last_hidden_state_or_every_state_gives_the_clean_probability(lab, facts):
    trace = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="hidden", samples=3)
    assert (trace.p_corrupt - trace.p_clean).abs().max() > 1e-5  # the noise does corrupt
    last_layer = len(trace.layers) - 1
    for f, tokens in enumerate(trace.tokens):  # the final hidden state at the last token carries everything
        assert trace.p_restored[f, last_layer, len(tokens) - 1] == pytest.approx(trace.p_clean[f].item(), abs=1e-5)
    # every position of the first block's output restored: the corrupted run becomes the clean run
    ids = lab.encode([facts[0].prompt])
    name = tracing.hook_name("hidden", 0)
    clean_logits, cache = tracing.run_with_cache(lab.model, ids, [name], lab.tokenizer.pad_token_id)
    noisy = {tracing.EMBED: lambda x: x + torch.randn_like(x)}
    with tracing.hooked(lab.model, {**noisy, name: lambda x: cache[name]}):
        restored = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)
    with tracing.hooked(lab.model, noisy):
        corrupted = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)
    assert torch.allclose(restored, clean_logits, atol=1e-5) and not torch.allclose(corrupted, clean_logits)


def test_tokens_before_the_subject_have_exactly_no_effect(lab):
    fact = next(f for f in lab.world.train_facts if f.subject_span[0] > 2)  # e.g. 'the home of X Y is in'
    trace = tracing.trace(lab.model, lab.tokenizer, *_args([fact]), noise=1.0, site="hidden", samples=2)
    assert (trace.effect[0, :, :fact.subject_span[0]] == 0).all()
    # check one such restoration by running it: the clean state there equals the corrupted one
    ids = lab.encode([fact.prompt])
    name = tracing.hook_name("hidden", 0)
    _, cache = tracing.run_with_cache(lab.model, ids, [name], lab.tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(1)
    noise = torch.zeros(1, ids.shape[1], lab.model.config.n_embd)
    noise[0, slice(*fact.subject_span)] = torch.randn(2, lab.model.config.n_embd, generator=gen)

    def restore_prefix(x):
        x = x.clone()
        x[:, :fact.subject_span[0]] = cache[name][:, :fact.subject_span[0]]
        return x

    with tracing.hooked(lab.model, {tracing.EMBED: lambda x: x + noise}):
        corrupted = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)
    with tracing.hooked(lab.model, {tracing.EMBED: lambda x: x + noise, name: restore_prefix}):
        restored = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)
    assert torch.allclose(restored, corrupted, atol=1e-6)


def test_hooks_leave_the_model_unchanged_even_after_an_error(lab, facts):
    ids = lab.encode([f.prompt for f in facts])
    before = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)
    weights = {n: p.clone() for n, p in lab.model.named_parameters()}
    hooks = _hooks(lab.model)
    tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="mlp", window=2, samples=2)
    with pytest.raises(RuntimeError, match="boom"), tracing.hooked(lab.model, {tracing.EMBED: lambda x: x * 0}):
        raise RuntimeError("boom")
    assert _hooks(lab.model) == hooks
    assert all(torch.equal(p, weights[n]) for n, p in lab.model.named_parameters())
    assert torch.equal(tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id), before)


def test_batching_and_chunking_change_nothing(lab, facts):
    one = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="attn", samples=2, chunk=1)
    many = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="attn", samples=2, chunk=4)
    assert torch.allclose(one.p_restored, many.p_restored, atol=1e-5, equal_nan=True)
    assert torch.allclose(one.p_corrupt, many.p_corrupt, atol=1e-6)
    # the same seed gives the same corrupted runs for every site
    hidden = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="hidden", samples=2)
    assert torch.allclose(hidden.p_corrupt, one.p_corrupt, atol=1e-6)


def test_key_tokens_and_layers_restrict_what_is_traced(lab, facts):
    trace = tracing.trace(lab.model, lab.tokenizer, *_args(facts[:2]), noise=1.0, tokens="key", layers=[1])
    assert trace.p_restored.shape[1] == 1 and trace.layers == [1]
    for f, ((_, end), tokens) in enumerate(zip(trace.spans, trace.tokens)):
        traced = (~trace.p_restored[f, 0].isnan()).nonzero()[:, 0].tolist()
        assert traced == sorted({end - 1, len(tokens) - 1})


def test_window_follows_rome_and_categories_average_as_in_the_paper():
    assert tracing._window(20, 10, 48) == list(range(15, 25))
    assert tracing._window(0, 10, 48) == list(range(0, 5)) and tracing._window(47, 10, 48) == list(range(42, 48))
    assert tracing._window(2, 1, 4) == [2]
    nan = float("nan")
    p = torch.tensor([[[nan, 0.5, 0.6, 0.7, 0.8, 0.9]]])  # one prompt, one layer: <bos> s1 s2 a b last
    trace = tracing.Trace("hidden", 1, 1.0, [0], [["<bos>", "s1", "s2", "a", "b", "c"]], [(1, 3)],
                          torch.tensor([1.0]), torch.tensor([0.5]), p)
    table = trace.by_category()[0]
    assert table.round(6).to_dict() == {"first subject token": 0.0, "last subject token": 0.1,
                                        "first token after": 0.2, "further tokens": 0.3, "last token": 0.4}


def test_categories_with_a_middle_token_and_a_null_and_untraced_tokens_left_out():
    nan = float("nan")
    # one prompt, one layer: w s1 s2 s3 a b c last; the subject is s1 s2 s3, token 6 ('c') not traced
    p = torch.tensor([[[nan, 0.5, 0.6, 0.7, 0.8, 0.9, nan, 1.0]]])
    trace = tracing.Trace("mlp", 10, 1.0, [0], [["w", "s1", "s2", "s3", "a", "b", "c", "last"]], [(1, 4)],
                          torch.tensor([1.0]), torch.tensor([0.4]), p)
    table = trace.by_category(null_positions=[5])[0]
    assert table.round(6).to_dict() == {"first subject token": 0.1, "middle subject tokens": 0.2,
                                        "last subject token": 0.3, "first token after": 0.4, "further tokens": 0.5,
                                        "last token": 0.6, tracing.NULL: 0.5}
    assert tracing.NULL not in trace.by_category().index
    with pytest.raises(ValueError, match="null_positions must hold one position per prompt"):
        trace.categories([1, 2])


def test_restoring_chosen_tokens_gives_the_same_values_in_any_subset(lab, facts):
    everything = tracing.trace(lab.model, lab.tokenizer, *_args(facts), noise=1.0, site="mlp", samples=2)
    chosen = [[f.subject_span[1] - 1] for f in facts[2:4]]  # the last subject token of two of the facts
    part = tracing.trace(lab.model, lab.tokenizer, *_args(facts[2:4]), noise=1.0, site="mlp", samples=2,
                         tokens=chosen, noise_keys=[2, 3])
    for row, (f, positions) in enumerate(zip((2, 3), chosen)):
        assert torch.allclose(part.p_restored[row, :, positions], everything.p_restored[f, :, positions], atol=1e-5)
        assert part.p_restored[row].isnan().sum() == part.p_restored.shape[1] * (part.p_restored.shape[2] - 1)
    with pytest.raises(ValueError, match="tokens must be 'all', 'key', or one non-empty list per prompt"):
        tracing.trace(lab.model, lab.tokenizer, *_args(facts[:1]), noise=1.0, tokens=[[0]])  # before the subject
    with pytest.raises(ValueError, match="noise_keys must hold one integer per prompt"):
        tracing.trace(lab.model, lab.tokenizer, *_args(facts[:2]), noise=1.0, noise_keys=[0])


@pytest.mark.parametrize(("site", "window", "layer"), [("hidden", 1, 1), ("mlp", 2, 1), ("attn", 1, 0)])
def test_one_restoration_by_hand_equals_the_trace_which_skips_the_blocks_below(lab, facts, site, window, layer):
    fact = facts[1]
    trace = tracing.trace(lab.model, lab.tokenizer, *_args([fact]), noise=1.0, site=site, window=window, samples=2,
                          seed=3, noise_keys=[5])
    ids = lab.encode([fact.prompt])
    start, end = fact.subject_span
    d = lab.model.config.n_embd
    noise = torch.zeros(2, ids.shape[1], d)
    noise[:, start:end] = tracing.subject_noise(1.0, 2, end - start, d, seed=3, index=5)
    restored = [tracing.hook_name(site, x) for x in tracing._window(layer, window, 2)]
    _, cache = tracing.run_with_cache(lab.model, ids, restored, lab.tokenizer.pad_token_id)

    def put_back(name):
        def fn(x):
            x = x.clone()
            x[:, end - 1] = cache[name][:, end - 1]
            return x
        return fn

    with tracing.hooked(lab.model, {tracing.EMBED: lambda x: x + noise, **{n: put_back(n) for n in restored}}):
        logits = tracing.last_logits(lab.model, ids.repeat(2, 1), lab.tokenizer.pad_token_id)  # [2, V]
        p = torch.softmax(logits, -1)[:, lab.tokenizer.get_vocab()[fact.object]].mean()
    assert trace.p_restored[0, layer, end - 1] == pytest.approx(p.item(), abs=1e-5)
    assert len(lm.layout(lab.model).model.transformer.h) == 2  # the model's blocks are back


def test_random_prefixes_move_the_subject_and_keep_the_prompt(lab, facts):
    from cl_lab.chapters import ch11
    prompts = ch11.with_prefixes(lab, facts, max_words=3, seed=1)
    vocabulary = {w for text in lab.world.general_train for w in text.split()}
    for prompt, fact in zip(prompts, facts):
        prefix = prompt[:-len(fact.prompt)].split()
        assert prompt.endswith(" " + fact.prompt) and 1 <= len(prefix) <= 3 and set(prefix) <= vocabulary
    assert ch11.with_prefixes(lab, facts, max_words=3, seed=1) == prompts  # seeded
    recall = ch11.prefix_recall(lab, facts, lengths=(0, 2), seed=1)
    assert list(recall.index) == [0, 2] and ((0 <= recall) & (recall <= 1)).all()
    with pytest.raises(ValueError, match="max_words must be"):
        ch11.with_prefixes(lab, facts, max_words=0)


def test_chunks_hold_prompts_of_one_length():
    assert tracing._chunks([5, 7, 5, 5, 7], chunk=2) == [[0, 2], [3], [1, 4]]


def test_subject_positions_and_answers(lab):
    for fact in lab.world.train_facts[:40]:
        assert tracing.subject_span(lab.tokenizer, fact.prompt, fact.subject) == fact.subject_span
    assert tracing.answer_token(lab.tokenizer, "Paris") == lab.tokenizer.get_vocab()["Paris"]
    with pytest.raises(ValueError, match="subject must occur in the prompt, got subject 'Zed Nobody'"):
        tracing.subject_span(lab.tokenizer, "Alva Ambrel lives in", "Zed Nobody")
    with pytest.raises(ValueError, match="answer must be a word of the vocabulary"):
        tracing.answer_token(lab.tokenizer, "Atlantis")


def test_bad_arguments_are_refused_by_name(lab, facts):
    args = _args(facts[:1])
    with pytest.raises(ValueError, match=r"layers must be layer indices in 0\.\.1, got \[5\]"):
        tracing.trace(lab.model, lab.tokenizer, *args, noise=1.0, layers=[5])
    with pytest.raises(ValueError, match="site must be one of"):
        tracing.trace(lab.model, lab.tokenizer, *args, noise=1.0, site="embed")
    with pytest.raises(ValueError, match="noise must be ≥ 0"):
        tracing.trace(lab.model, lab.tokenizer, *args, noise=-1.0)
    with pytest.raises(ValueError, match="equally long"):
        tracing.trace(lab.model, lab.tokenizer, args[0], args[1], [], noise=1.0)
    with pytest.raises(ValueError, match="name must be 'hook_embed' or"):
        tracing.module_of(lab.model, "blocks.0.resid")
    assert tracing.module_of(lab.model, "blocks.1.hook_mlp_out") is lab.model.transformer.h[1].mlp
    assert tracing.module_of(lab.model, "blocks.0.hook_attn_out") is lab.model.transformer.h[0].attn
