"""The language-model lab on a tiny configuration: world, tokenizer, cache, classifier view, streams, methods."""

import dataclasses
import math
import threading
import time

import pytest
import torch

from cl_lab import train
from cl_lab.lm import (
    BASE_RELATIONS,
    NEW_RELATIONS,
    QUESTION,
    KLToBase,
    LMClassifier,
    LMConfig,
    TextReplay,
    World,
    build_tokenizer,
    config_key,
    decode,
    encode,
    evaluate,
    extend_vocabulary,
    fact_batch,
    fact_stream,
    kl_divergence,
    layout,
    lm_loss,
    perplexity,
    recall,
    tiny_lm,
    weight_out_in,
)
from cl_lab.lm import cache as lm_cache
from cl_lab.lm import lab as lab_module

TINY = dict(n_layer=1, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


@pytest.fixture(scope="module")
def lab():
    return tiny_lm(0, progress=False, use_cache=False, **TINY)


# --- the world -----------------------------------------------------------------------------------------------

def test_world_is_deterministic_per_seed():
    a, b, c = World(3, n_subjects=30), World(3, n_subjects=30), World(4, n_subjects=30)
    assert a.train_facts == b.train_facts and a.heldout_facts == b.heldout_facts
    assert a.general_train == b.general_train and a.general_test == b.general_test
    assert a.knowledge != c.knowledge
    assert a.vocabulary() == c.vocabulary()  # one tokenizer for every seed


def test_heldout_pairs_never_appear_in_the_pretraining_corpus():
    world = World(0, n_subjects=40)
    trained = {(f.subject, f.relation, f.template) for f in world.train_facts}
    held = {(f.subject, f.relation, f.template) for f in world.heldout_facts}
    assert held and not trained & held
    corpus = world.pretraining_texts()
    assert not any(text.startswith(f.prompt + " ") for f in world.heldout_facts for text in corpus)
    assert not set(world.general_test) & set(world.general_train)


def test_every_template_is_trained_with_some_subjects_and_held_out_with_others():
    world = World(0)
    for rel in BASE_RELATIONS:
        for t in range(len(rel.templates)):
            n_train = sum(f.relation == rel.name and f.template == t for f in world.train_facts)
            n_held = sum(f.relation == rel.name and f.template == t for f in world.heldout_facts)
            assert n_train >= world.n_subjects // 2 and n_held > 0, (rel.name, t, n_train, n_held)
    per_fact = len(world.heldout_facts) / (world.n_subjects * len(BASE_RELATIONS))
    assert per_fact == world.heldout_per_fact


def test_subject_span_points_at_the_subject_tokens(lab):
    facts = lab.world.train_facts[:40] + lab.world.questions("speaks", lab.world.subjects[:3])
    for f in facts:
        ids = encode(lab.tokenizer, f.prompt)[0]
        start, end = f.subject_span
        assert decode(lab.tokenizer, ids[start:end]) == f.subject
        assert f.subject_span[1] - f.subject_span[0] == 2  # first and last name


def test_fresh_subjects_are_disjoint_from_the_pretrained_ones():
    world = World(0, n_subjects=50)
    fresh = world.fresh_subjects(30) + world.fresh_subjects(30, start=30)
    assert len(set(fresh)) == 60 and not set(fresh) & set(world.subjects)


def test_new_domain_words_are_outside_the_vocabulary(lab):
    domain = lab.world.new_domain(n_subjects=4)
    assert domain.vocabulary and not set(domain.vocabulary) & set(lab.world.vocabulary())
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary: 'Zorvan'|outside"):
        encode(lab.tokenizer, domain.texts)
    bigger = extend_vocabulary(lab, domain.vocabulary)
    ids = encode(bigger.tokenizer, domain.texts)
    assert decode(bigger.tokenizer, ids[0]) == domain.texts[0]
    assert bigger.model.get_input_embeddings().weight.shape[0] == len(bigger.tokenizer)
    old = encode(lab.tokenizer, lab.world.general_test)
    assert torch.equal(encode(bigger.tokenizer, lab.world.general_test), old)  # old ids keep their meaning


def test_world_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_subjects"):
        World(0, n_subjects=451)
    with pytest.raises(ValueError, match="heldout_per_fact"):
        World(0, heldout_per_fact=5)
    with pytest.raises(TypeError, match="n_general"):
        World(0, n_general=1.5)


# --- the tokenizer -------------------------------------------------------------------------------------------

def test_tokenizer_round_trips_every_text_of_the_world(lab):
    world = lab.world
    texts = (world.pretraining_texts() + world.general_test + [f.sentence for f in world.heldout_facts]
             + [f.sentence for r in NEW_RELATIONS[:1] for f in world.render_split(
                 world.assign_objects(world.subjects[:3], [r], tag="t"), tag="t")[0]])
    ids = encode(lab.tokenizer, texts)
    assert (ids[:, 0] == lab.tokenizer.bos_token_id).all()
    assert not (ids == lab.tokenizer.unk_token_id).any()
    assert [decode(lab.tokenizer, row) for row in ids] == texts
    assert (ids.ne(lab.tokenizer.pad_token_id).sum(1) == torch.tensor([len(t.split()) + 1 for t in texts])).all()


def test_tokenizer_rejects_unknown_words_by_name(lab):
    with pytest.raises(ValueError, match=r"2 word\(s\) outside the tokenizer's vocabulary: 'Zorp', 'blix'"):
        encode(lab.tokenizer, ["Mira Tolvane lives in Zorp", "blix ."])
    with pytest.raises(ValueError, match="length"):
        encode(lab.tokenizer, ["Mira Tolvane lives in"], length=3)
    with pytest.raises(ValueError, match="distinct words"):
        build_tokenizer(["a", "a"])


# --- the cache -------------------------------------------------------------------------------------------------

def _other_value(value):
    return value * 2 if value else 1  # valid for every field (n_embd stays a multiple of n_head)


def test_cache_key_changes_with_every_config_field_and_the_corpus_version(monkeypatch):
    base = LMConfig(**TINY)
    key = config_key(base)
    assert config_key(LMConfig(**TINY)) == key
    for f in dataclasses.fields(LMConfig):
        changed = dataclasses.replace(base, **{f.name: _other_value(getattr(base, f.name))})
        assert config_key(changed) != key, f.name
    monkeypatch.setattr(lab_module, "CORPUS_VERSION", lab_module.CORPUS_VERSION + 1)
    assert config_key(base) != key


def test_cached_lab_loads_the_same_weights_and_a_stale_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_LAB_CACHE", str(tmp_path / "cl_lab"))
    first = tiny_lm(0, progress=False, **TINY)
    again = tiny_lm(0, progress=False, **TINY)
    assert first.info["pretrained_now"] and not again.info["pretrained_now"]
    assert str(tmp_path) in again.info["cache"]
    for (n, p), q in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(p, q), n
    monkeypatch.setattr(lab_module, "CORPUS_VERSION", lab_module.CORPUS_VERSION + 1)
    bumped = tiny_lm(0, progress=False, **TINY)
    assert bumped.info["pretrained_now"] and bumped.info["cache"] != first.info["cache"]
    assert not list(tmp_path.glob("cl_lab/lm/.*"))  # no temporary folders left behind


def test_concurrent_first_calls_pretrain_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_LAB_CACHE", str(tmp_path / "cl_lab"))
    calls, real_pretrain = [], lab_module.pretrain

    def slow_pretrain(config, progress=True):
        calls.append(config)
        time.sleep(1.0)  # hold the lock while the other caller arrives
        return real_pretrain(config, progress=False)

    monkeypatch.setattr(lab_module, "pretrain", slow_pretrain)
    labs = [None, None]

    def call(i):
        labs[i] = tiny_lm(1, progress=False, **TINY)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(lab.info["pretrained_now"] for lab in labs) == [False, True]


def test_a_failed_pretraining_leaves_no_folder(tmp_path):
    def boom(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        lm_cache.ensure("k", boom, root=tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "k.lock"]


def test_tiny_lm_rejects_unknown_and_bad_config():
    with pytest.raises(TypeError, match="unknown field.*n_layers"):
        tiny_lm(0, n_layers=2)
    with pytest.raises(ValueError, match="n_embd must be a multiple of n_head"):
        LMConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="steps"):
        LMConfig(steps=0)


# --- the classifier view -------------------------------------------------------------------------------------

def test_classifier_logits_are_the_lm_next_token_logits_at_the_last_real_token(lab):
    facts = lab.world.train_facts[:5] + lab.world.questions("lives_in", lab.world.subjects[:2])
    clf = lab.as_classifier()
    x, _ = fact_batch(lab.tokenizer, facts)
    wide, _ = fact_batch(lab.tokenizer, facts, length=x.shape[1] + 7)
    with torch.no_grad():
        out, out_wide = clf(x), clf(wide)
        for f, row in zip(facts, out):
            alone = encode(lab.tokenizer, f.prompt)  # [1, n], no padding
            expected = lab.model(input_ids=alone).logits[0, -1]
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_wide, out, atol=1e-5, rtol=1e-5)
    assert out.shape == (len(facts), lab.model.config.vocab_size)
    assert list(clf.parameters())[0] is list(lab.model.parameters())[0]  # a view: the same weights


def test_classifier_rejects_left_padding_and_float_inputs(lab):
    clf = lab.as_classifier()
    x = encode(lab.tokenizer, ["Mira Tolvane lives in", "copy : alpha = alpha ."])
    with pytest.raises(ValueError, match="right-padded"):
        clf(x.flip(1))
    with pytest.raises(ValueError, match="dtype long"):
        clf(x.float())


# --- streams and train.fit -----------------------------------------------------------------------------------

def test_fact_stream_fits_the_batch_protocol(lab):
    for kind, n in (("subjects", 3), ("relation", 3), ("format", 4)):
        stream = fact_stream(lab, n_tasks=n, kind=kind, n_subjects=4)
        assert stream.scenario == "domain" and stream.n_out == lab.model.config.vocab_size
        for task in stream:
            assert task.x_train.dtype == torch.long and task.x_train.shape[1:] == stream.input_shape
            x, y = fact_batch(lab.tokenizer, task.train_facts, length=stream.input_shape[0])
            assert torch.equal(x, task.x_train) and torch.equal(y, task.y_train)
    fresh = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=4)
    people = [{f.subject for f in t.train_facts} for t in fresh]
    assert not people[0] & people[1] and not people[0] & set(lab.world.subjects)
    relations = fact_stream(lab, n_tasks=3, kind="relation", n_subjects=4)
    assert [t.train_facts[0].relation for t in relations] == [r.name for r in NEW_RELATIONS]
    formats = fact_stream(lab, n_tasks=2, kind="format", n_subjects=4)
    for t in formats:
        assert {f.template for f in t.train_facts} == {QUESTION}
        assert not {f.subject for f in t.train_facts} & {f.subject for f in t.test_facts}
        assert all(lab.world.knowledge[(f.subject, f.relation)] == f.object for f in t.test_facts)


def test_fact_stream_rejects_bad_sizes(lab):
    with pytest.raises(ValueError, match="n_tasks must be at most 3"):
        fact_stream(lab, n_tasks=4, kind="relation")
    with pytest.raises(ValueError, match="kind"):
        fact_stream(lab, kind="facts")
    with pytest.raises(ValueError, match="n_subjects must be at most 10"):
        fact_stream(lab, n_tasks=2, kind="format", n_subjects=11)


def _fit(lab, stream, method=None, steps=60, seed=0):
    return train.fit(lab.copy().as_classifier(), stream, method, steps=steps, lr=1e-2, batch_size=16,
                     seed=seed, progress=False)


def test_sequential_fact_tasks_are_learned_then_forgotten(lab):
    stream = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=3)
    run = _fit(lab, stream, steps=100)
    assert run.R.shape == (2, 2)
    assert run.R[0, 0] >= 0.8 and run.R[1, 1] >= 0.8
    assert run.R[1, 0] <= run.R[0, 0] - 0.3
    assert run.bwt < -0.3


# --- methods ---------------------------------------------------------------------------------------------------

def test_text_replay_keeps_its_token_share(lab):
    stream = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=3)
    replay = TextReplay(lab, token_share=0.25, seed=1)
    _fit(lab, stream, replay, steps=40)
    longest = max(replay.row_tokens)
    assert replay.task_tokens == 2 * 40 * 16
    assert abs(replay.share - 0.25) <= longest / (replay.task_tokens + replay.replay_tokens)


def test_text_replay_at_zero_share_is_naive_fine_tuning(lab):
    stream = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=3)
    none = TextReplay(lab, token_share=0.0)
    assert (_fit(lab, stream, none, steps=20).R == _fit(lab, stream, steps=20).R).all()
    assert none.replay_tokens == 0


def test_text_replay_loss_is_the_summed_token_loss_over_the_batch_size(lab):
    replay = TextReplay(lab, token_share=0.5, seed=0)
    stream = fact_stream(lab, n_tasks=1, n_subjects=2)
    ctx = type("Ctx", (), {"model": lab.as_classifier()})()
    y = torch.zeros(8, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    expected_rows = []
    owed = 8.0
    while owed > 0:
        i = int(torch.randint(len(replay.row_tokens), (1,), generator=gen))
        expected_rows.append(i)
        owed -= replay.row_tokens[i]
    extra = replay.extra_loss(ctx, stream[0].x_train[:8], y, y, None)
    expected = lm_loss(lab.model, replay.ids[expected_rows], 0, reduction="sum") / 8
    torch.testing.assert_close(extra, expected)


def test_kl_divergence_matches_torch_and_kl_to_base_starts_at_zero(lab):
    p, q = torch.randn(4, 7, 11), torch.randn(4, 7, 11)
    reference = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), reference)
    stream = fact_stream(lab, n_tasks=1, n_subjects=2)
    x = stream[0].x_train[:8]
    clf = lab.as_classifier()
    ctx = type("Ctx", (), {"model": clf})()
    for on in ("task", "text"):
        kl = KLToBase(lab, beta=1.0, on=on)
        assert kl.extra_loss(ctx, x, None, None, clf(x)).abs().item() < 1e-6


def test_kl_to_base_keeps_the_model_closer_to_the_base(lab):
    stream = fact_stream(lab, n_tasks=1, n_subjects=3)
    x = lab.as_classifier()
    drift = {}
    for name, method in (("naive", None), ("kl", KLToBase(lab, beta=5.0, on="text"))):
        model = lab.copy().as_classifier()
        train.fit(model, stream, method, steps=40, lr=1e-2, batch_size=16, progress=False)
        ids = encode(lab.tokenizer, lab.world.general_test)
        mask = ids.ne(lab.tokenizer.pad_token_id)
        with torch.no_grad():
            current, base = (m.lm(input_ids=ids, attention_mask=mask.long()).logits for m in (model, x))
            drift[name] = kl_divergence(current, base)[mask].mean().item()
    assert drift["kl"] < 0.5 * drift["naive"]


def test_methods_of_earlier_chapters_run_on_the_lm(lab):
    from cl_lab.methods.regularization import EWC
    from cl_lab.methods.replay import ER
    stream = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=3)
    for method in (ER(buffer_size=40), EWC(lam=10.0, fisher="batch_squared", batch_size=1, n_samples=20)):
        run = _fit(lab, stream, method, steps=20)
        assert run.R.shape == (2, 2) and 0 <= run.R.min() <= run.R.max() <= 1


# --- evaluate ----------------------------------------------------------------------------------------------------

def test_evaluate_returns_one_row_with_its_definitions(lab):
    world = lab.world
    row = evaluate(lab.model, lab.tokenizer, world)
    assert set(row) == {"recall", "paraphrase", "neighbourhood", "perplexity"}
    assert row["recall"] == recall(lab.model, lab.tokenizer, world.train_facts) == row["neighbourhood"]
    assert row["paraphrase"] == recall(lab.model, lab.tokenizer, world.heldout_facts)
    targets = [f for f in world.train_facts if f.subject in world.subjects[:5]]
    edited = [f.with_object("Paris") for f in targets]
    row = evaluate(lab.as_classifier(), lab.tokenizer, world, targets=edited)
    rest = [f for f in world.train_facts if f.subject not in world.subjects[:5]]
    assert row["neighbourhood"] == recall(lab.model, lab.tokenizer, rest)
    assert row["target"] == recall(lab.model, lab.tokenizer, edited)
    assert 0 <= min(row["recall"], row["paraphrase"], row["target"]) <= max(row["recall"], row["target"]) <= 1


def test_perplexity_is_exp_of_the_mean_token_loss(lab):
    texts = lab.world.general_test[:3]
    ids = encode(lab.tokenizer, texts, add_eos=True)
    total, count = 0.0, 0
    for text in texts:
        one = encode(lab.tokenizer, text, add_eos=True)
        with torch.no_grad():
            logits = lab.model(input_ids=one).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, one[0, 1:], reduction="sum").item()
        count += one.shape[1] - 1
    assert count == int(ids[:, 1:].ne(0).sum())
    assert perplexity(lab.model, lab.tokenizer, texts) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_layout_finds_gpt2_modules_and_their_conv1d_weights(lab):
    lay = layout(lab.as_classifier())
    assert lay.family == "gpt2" and lay.n_layers == 1
    assert lay.path("mlp_out", 0) == "transformer.h.0.mlp.c_proj"
    proj = lay.mlp_out(0)
    w = weight_out_in(proj)  # [out, in]
    assert w.shape == (lab.config.n_embd, 4 * lab.config.n_embd)
    h = torch.randn(3, 4 * lab.config.n_embd)
    torch.testing.assert_close(proj(h), h @ w.T + proj.bias)
    with pytest.raises(ValueError, match="layer must be in 0..0"):
        lay.path("mlp", 1)


def test_importing_cl_lab_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, cl_lab; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_peft_lora_on_the_classifier_view_trains_adapters_only(lab):
    from peft import LoraConfig, get_peft_model
    model = lab.copy().model
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    clf = LMClassifier(peft_model, lab.tokenizer.pad_token_id)
    assert layout(clf).mlp_out(0) is peft_model.get_base_model().transformer.h[0].mlp.c_proj
    stream = fact_stream(lab, n_tasks=2, kind="subjects", n_subjects=3)
    run = train.fit(clf, stream, TextReplay(lab, 0.1), steps=20, lr=1e-2, batch_size=16, progress=False)
    assert run.R.shape == (2, 2)
    base = peft_model.get_base_model()
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in base.named_parameters() if "lora_B" in n)


def test_smoke_config_gives_a_lab_every_stream_kind_accepts_at_its_defaults(tmp_path, monkeypatch):
    from cl_lab.lm import SMOKE_CONFIG
    monkeypatch.setenv("CL_LAB_CACHE", str(tmp_path / "cl_lab"))
    smoke = tiny_lm(0, progress=False, **SMOKE_CONFIG)
    for kind, n_tasks in (("subjects", 3), ("relation", 3), ("format", 4)):
        assert len(fact_stream(smoke, n_tasks=n_tasks, kind=kind)) == n_tasks
