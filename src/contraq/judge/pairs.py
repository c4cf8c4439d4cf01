"""The synthetic (premise, hypothesis, label) pairs the offline judge is trained on.

Premise = an edit fact worded with one of its answers; hypothesis = a freely worded statement:
the same relation with the same object -> entailment, with another object -> contradiction,
another subject or relation -> neutral. The neutrals include the shapes of known reward hacks
of the GFlowNet policy (:meth:`PairBuilder.hack_hypothesis`). Everything is drawn from a
``random.Random`` passed in, so the pairs are a pure function of the facts and the seed.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from contraq.genuine import normalize_text
from contraq.judge.facts import FactRow, same_answer
from contraq.judge.forms import (
    COPULA_END,
    QUESTION_FORM,
    YEAR,
    article,
    explicit_forms,
    fill,
    negate,
    pronoun_forms,
    role_forms,
    role_object,
    sentence,
    short_forms,
)
from contraq.judge.near import NEAR_TABLE, lookup
from contraq.judge.vocab import (
    CATEGORIES,
    CATEGORY_RELATION,
    FILLERS,
    ORIGIN_RELATION,
    OVERLAP_NAMES,
    ROLE_RELATION,
    HackVocab,
    load_table,
    split_hack_vocab,
)

# Label order of the checkpoints trained here (the scorer reads id2label, so any order works).
TRAIN_LABELS: tuple[str, str, str] = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class NLIPair:
    """A labelled pair; ``kind`` says how the hypothesis was built (for per-kind metrics)."""

    premise: str
    hypothesis: str
    label: str
    kind: str


class _Union:
    """Union-find over relation keys; a cluster is named by its smallest key."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _relation_key(row: FactRow) -> str:
    if row.template is None:
        return "prompt:" + row.prompt.lower()
    return re.sub(r"\b(is|was|are|were)\b", "BE", row.template.lower())


class PairBuilder:
    """Builds labelled (premise, hypothesis) pairs from edit facts.

    Relations are clusters of templates: templates of one subject whose original answers
    agree (:func:`same_answer`) name the same relation ("The manufacturer of _ was" ~ "The
    company that manufactured _ is"), and tense variants are merged. A premise is a fact
    ``(template, subject, object)``; hypotheses:

    - entailment: a template of the same relation, same subject and object, worded
      explicitly, with a pronoun, or as a bare answer;
    - contradiction: the same, with another object (the other side of the edit, or another
      answer of the same relation);
    - neutral: the same relation about another subject (same or other object; a subject of
      the data or a well-known one), another relation about the same subject, an unrelated
      fact, or a reward-hack shape: a description of the subject that ignores the relation
      ("X is a revolver", "X is known for ...", "X was born in ..."), a non-answer ("I don't
      know."), or the question restated.

    ``vocab`` holds the word lists of the hack shapes (default: the training share of
    :func:`split_hack_vocab`).
    """

    # Neutral kinds and their shares of the neutral class (the hack shapes take ~1/3).
    NEUTRAL_MIX: tuple[tuple[str, float], ...] = (
        ("other-subject", 0.26),
        ("famous-subject", 0.16),  # v5: 0.08 -> 0.16 (v4 read "The capital of Germany is Berlin."
        ("other-relation", 0.22),  # against "...France is Lyon" as 0.53 contradiction)
        ("unrelated", 0.03),
        ("descriptive", 0.18),
        ("nonanswer", 0.05),
        ("question", 0.10),  # v4: 0.05 -> 0.10 (the reward judges questions too: echo check)
    )
    NEGATION_SHARE = 0.25  # v4: share of premises with a negated contradiction (and neutral)
    HACK_KINDS: tuple[str, ...] = ("famous-subject", "descriptive", "nonanswer", "question")
    FULL_MIX: tuple[tuple[str, float], ...] = (
        ("explicit", 0.55),
        ("pronoun", 0.25),
        ("short", 0.2),
    )

    def __init__(self, rows: Sequence[FactRow], vocab: HackVocab | None = None) -> None:
        self.rows = list(rows)
        self.vocab = vocab if vocab is not None else split_hack_vocab()[0]
        if not self.rows:
            raise ValueError("PairBuilder: no edit facts")
        uf = _Union()
        by_subject: dict[str, list[FactRow]] = defaultdict(list)
        for r in self.rows:
            uf.find(_relation_key(r))
            by_subject[r.subject.lower()].append(r)
        for rs in by_subject.values():
            for a in rs:
                for b in rs:
                    if a is not b and same_answer(a.original, b.original):
                        uf.union(_relation_key(a), _relation_key(b))
        self.by_subject = by_subject
        self.rel = {id(r): uf.find(_relation_key(r)) for r in self.rows}
        self._aliases: list[FactRow] = []
        # Subjects a fact may be moved to (build_datasets keeps held-out subjects out).
        self.swap_subjects = sorted({r.subject for r in self.rows})
        self.swap_famous = list(self.vocab.famous_subjects)
        templates: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
        objects: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for r in self.rows:
            c = self.rel[id(r)]
            if (r.template, r.prompt) not in templates[c]:
                templates[c].append((r.template, r.prompt))
            for o in (r.edited, r.original):
                if (r.subject, o) not in objects[c]:
                    objects[c].append((r.subject, o))
        self.templates = templates
        self.objects = objects
        # Near objects per relation (contraq.judge.near): the hard contradictions.
        self.near: dict[str, dict[str, list[str]]] = load_table(NEAR_TABLE)
        self._classify_relations()

    def _classify_relations(self) -> None:
        """Which neutral shapes may address each relation (see vocab.CATEGORY_RELATION)."""
        templates, objects = self.templates, self.objects
        all_categories = {normalize_text(c) for c in CATEGORIES}
        self.category_like = {
            c: any(t is not None and CATEGORY_RELATION.search(t) for t, _ in ts)
            or any(normalize_text(o) in all_categories for _, o in objects[c])
            for c, ts in templates.items()
        }
        self.origin_like = {
            c: any(ORIGIN_RELATION.search(t if t is not None else p) for t, p in ts)
            for c, ts in templates.items()
        }
        self.year_like = {c: any(YEAR.search(o) for _, o in objects[c]) for c in templates}
        self.role_like = {
            c: any(t is not None and ROLE_RELATION.search(t) for t, _ in ts)
            for c, ts in templates.items()
        }

    def n_relations(self) -> int:
        return len(self.templates)

    def _render(
        self,
        rng: random.Random,
        template: str | None,
        prompt: str,
        subject: str,
        obj: str,
        kinds: Sequence[tuple[str, float]],
    ) -> tuple[str, str]:
        kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        if kind == "pronoun":
            forms = pronoun_forms(template, obj)
            if not forms:
                kind = "explicit"
        if kind == "explicit":
            forms = explicit_forms(template, prompt, subject, obj)
        elif kind == "short":
            forms = short_forms(obj)
        text = rng.choice(forms)
        if kind != "short" and rng.random() < 0.12:
            text = rng.choice(FILLERS) + text[0].lower() + text[1:]
        return sentence(text, rng), kind

    def _hyp_template(self, rng: random.Random, row: FactRow) -> tuple[str | None, str]:
        if rng.random() < 0.4:
            return row.template, row.prompt
        return rng.choice(self.templates[self.rel[id(row)]])

    def with_subject(self, row: FactRow, subject: str) -> FactRow:
        """``row`` about another subject (same relation and objects), registered under the
        same relation. Labels do not depend on which subject a fact is about, so this teaches
        the judge that a well-known subject in the hypothesis is no sign of a neutral pair."""
        if row.template is None:
            return row
        new = FactRow(
            fill(row.template, subject),
            subject,
            row.template,
            row.edited,
            row.original,
            row.origin,
        )
        self.rel[id(new)] = self.rel[id(row)]
        self._aliases.append(new)  # keeps id(new) valid while the builder lives
        return new

    def _swap_subject(self, row: FactRow, rng: random.Random) -> FactRow:
        famous = rng.random() < 0.5
        pool = self.swap_famous if famous else self.swap_subjects
        if not pool:
            return row
        subject = rng.choice(pool)
        if subject.lower() == row.subject.lower():
            return row
        return self.with_subject(row, subject)

    def _overlap_subject(self, row: FactRow, rng: random.Random) -> FactRow:
        """``row`` moved to a made-up subject that names one of its two objects ("Radio
        Moscow" for "... created in Moscow"), so that an object named in the subject is no
        sign of either label: it is the premise's object as often as the other one."""
        obj = rng.choice((row.edited, row.original))
        return self.with_subject(row, rng.choice(OVERLAP_NAMES).format(o=obj))

    def pairs_for(
        self,
        row: FactRow,
        rng: random.Random,
        *,
        premise_side: str = "edited",
        per_class: int = 1,
        subject_swap: float = 0.0,
        overlap_swap: float = 0.0,
        near_share: float = 0.0,
    ) -> list[NLIPair]:
        """``per_class`` pairs of each label for the premise ``row`` worded with its edited
        (``premise_side="edited"``: the reward's case) or original answer. With probability
        ``subject_swap`` the fact is first moved to another subject (:meth:`with_subject`),
        else with probability ``overlap_swap`` to a subject naming one of its objects
        (:meth:`_overlap_subject`). ``near_share``: share of the other-answer contradictions
        whose object is one of the nearest in meaning (:mod:`contraq.judge.near`)."""
        if premise_side not in ("edited", "original"):
            raise ValueError(f"premise_side must be 'edited' or 'original', got {premise_side!r}")
        if subject_swap > 0 and rng.random() < subject_swap:
            row = self._swap_subject(row, rng)
        elif overlap_swap > 0 and rng.random() < overlap_swap:
            row = self._overlap_subject(row, rng)
        obj = row.edited if premise_side == "edited" else row.original
        other_side = row.original if premise_side == "edited" else row.edited
        premise = f"{row.prompt} {obj}"
        rel = self.rel[id(row)]
        out: list[NLIPair] = []
        for _ in range(per_class):
            out.append(self._entailment(row, obj, premise, rng))
            contra = self._contradiction(row, obj, other_side, premise, rng, near_share)
            if contra is not None:
                out.append(contra)
            neutral = self._neutral(row, obj, rel, premise, rng)
            if (
                neutral.kind.startswith(("neutral-other", "neutral-unrelated"))
                and rng.random() < self.NEGATION_SHARE
            ):
                neg = sentence(negate(neutral.hypothesis.rstrip(".")), rng)
                neutral = NLIPair(premise, neg, "neutral", neutral.kind + "-negated")
            out.append(neutral)
        return out

    def _entailment(self, row: FactRow, obj: str, premise: str, rng: random.Random) -> NLIPair:
        t, p = self._hyp_template(rng, row)
        hyp, kind = self._render(rng, t, p, row.subject, obj, self.FULL_MIX)
        if self.role_like[self.rel[id(row)]] and rng.random() < 0.5 and role_object(obj):
            hyp, kind = sentence(rng.choice(role_forms(row.subject, obj)), rng), "role"
        return NLIPair(premise, hyp, "entailment", f"entail-{kind}")

    def _contradiction(
        self,
        row: FactRow,
        obj: str,
        other_side: str,
        premise: str,
        rng: random.Random,
        near_share: float = 0.0,
    ) -> NLIPair | None:
        """The other side of the edit, another answer of the relation (with probability
        ``near_share`` one of the nearest in meaning), or a negation of ``obj``; ``None``
        when no answer differs from ``obj``."""
        rel = self.rel[id(row)]
        cluster_others = [o for _, o in self.objects[rel] if not same_answer(o, obj)]
        wrong: str | None
        if not same_answer(other_side, obj) and (not cluster_others or rng.random() < 0.5):
            wrong, src = other_side, "edit"
        elif cluster_others:
            wrong, src = rng.choice(cluster_others), "relation"
            near = lookup(self.near, rel, obj) if near_share > 0 else []
            if near and rng.random() < near_share:
                wrong, src = rng.choice(near), "near"
        else:  # a one-fact relation whose two answers coincide: any other answer
            wrong = rng.choice(self.rows).original
            src = "any"
            if same_answer(wrong, obj):
                wrong = None
        if rng.random() < self.NEGATION_SHARE:
            # "X is not <own object>" contradicts; negated neutrals (pairs_for) keep "not"
            # from becoming a shortcut for the contradiction class.
            t, p = self._hyp_template(rng, row)
            hyp, _ = self._render(rng, t, p, row.subject, obj, (("explicit", 1.0),))
            hyp = sentence(negate(hyp.rstrip(".")), rng)
            return NLIPair(premise, hyp, "contradiction", "contra-negation")
        if wrong is None:
            return None
        t, p = self._hyp_template(rng, row)
        hyp, kind = self._render(rng, t, p, row.subject, wrong, self.FULL_MIX)
        if self.role_like[rel] and rng.random() < 0.5 and role_object(wrong):
            hyp, kind = sentence(rng.choice(role_forms(row.subject, wrong)), rng), "role"
        return NLIPair(premise, hyp, "contradiction", f"contra-{src}-{kind}")

    def _neutral(
        self, row: FactRow, obj: str, rel: str, premise: str, rng: random.Random
    ) -> NLIPair:
        mix = self.NEUTRAL_MIX
        kind = rng.choices([k for k, _ in mix], weights=[w for _, w in mix])[0]
        if kind in self.HACK_KINDS:
            made = self.hack_hypothesis(row, obj, kind, rng)
            if made is not None:
                return NLIPair(premise, made[0], "neutral", made[1])
            kind = "other-relation"  # the shape does not apply to this relation
        if kind == "other-subject":
            made = self._other_subject(row, obj, rel, rng)
            if made is not None:
                return NLIPair(premise, made, "neutral", "neutral-other-subject")
            kind = "other-relation"
        if kind == "other-relation":
            subj_rows = [r for r in self.by_subject[row.subject.lower()] if self.rel[id(r)] != rel]
            if subj_rows and rng.random() < 0.5:
                other = rng.choice(subj_rows)
            else:
                other = rng.choice(self.rows)
            if self.rel[id(other)] != rel and other.template is not None:
                o = rng.choice((other.original, other.edited))
                hyp, shape = self._render(
                    rng,
                    other.template,
                    other.prompt,
                    row.subject,
                    o,
                    (("explicit", 0.7), ("pronoun", 0.3)),
                )
                return NLIPair(premise, hyp, "neutral", f"neutral-other-relation-{shape}")
        other = rng.choice(self.rows)
        while other.subject.lower() == row.subject.lower() and len(self.by_subject) > 1:
            other = rng.choice(self.rows)
        hyp, _ = self._render(
            rng,
            other.template,
            other.prompt,
            other.subject,
            rng.choice((other.original, other.edited)),
            (("explicit", 1.0),),
        )
        return NLIPair(premise, hyp, "neutral", "neutral-unrelated")

    def _other_subject(self, row: FactRow, obj: str, rel: str, rng: random.Random) -> str | None:
        """The same relation about another subject of the data (same or other object), or
        ``None`` when no other subject or no template applies."""
        others = [s for s, _ in self.objects[rel] if s.lower() != row.subject.lower()]
        subject = (
            rng.choice(others) if others and rng.random() < 0.7 else rng.choice(self.rows).subject
        )
        if subject.lower() == row.subject.lower():
            subject = rng.choice(self.rows).subject
        if subject.lower() == row.subject.lower():
            return None
        # "Same relation, other subject, other object" must not read as a contradiction.
        o = obj if rng.random() < 0.3 else rng.choice(self.objects[rel])[1]
        t, p = self._hyp_template(rng, row)
        if t is None:  # the subject is not in the prompt: no way to swap it
            t, p = row.template, row.prompt
        if t is None:
            return None
        hyp, _ = self._render(rng, t, p, subject, o, (("explicit", 1.0),))
        return hyp

    def hack_hypothesis(
        self,
        row: FactRow,
        obj: str,
        kind: str,
        rng: random.Random,
        vocab: HackVocab | None = None,
    ) -> tuple[str, str] | None:
        """A neutral hypothesis of a reward-hack shape for the premise ``row`` (with object
        ``obj``) and its pair kind, or ``None`` when the shape could address the relation.

        ``kind``: "descriptive" ("X is a revolver", "X is known for its design", "X was born
        in Vienna", "X is very interesting"), "nonanswer" ("I don't know."), "question" (the
        prompt restated as a question) or "famous-subject" (the same relation about a
        well-known subject: "The capital of Germany is Berlin").
        """
        v = vocab if vocab is not None else self.vocab
        rel, s = self.rel[id(row)], row.subject
        if kind == "descriptive":
            return self._descriptive(row, v, rng)
        if kind == "nonanswer":
            text = rng.choice(v.non_answers).format(s=s)
            return sentence(text, rng, period_p=1.0), "neutral-nonanswer"
        if kind == "question":
            return sentence(self._question(row, rng), rng, period_p=0.0), "neutral-question"
        if kind == "famous-subject":
            subjects = [x for x in v.famous_subjects if x.lower() != s.lower()]
            t, p = self._hyp_template(rng, row)
            if t is None:
                t, p = row.template, row.prompt
            if t is None or not subjects:
                return None
            o = obj if rng.random() < 0.3 else rng.choice(self.objects[rel])[1]
            hyp, _ = self._render(rng, t, p, rng.choice(subjects), o, (("explicit", 1.0),))
            return hyp, "neutral-famous-subject"
        raise ValueError(f"hack_hypothesis: unknown kind {kind!r}; expected {self.HACK_KINDS}")

    def _descriptive(self, row: FactRow, v: HackVocab, rng: random.Random) -> tuple[str, str]:
        """A description of the subject that ignores the relation, and its pair kind."""
        rel, s = self.rel[id(row)], row.subject
        shapes = ["known", "echo"]
        if not self.category_like[rel]:
            shapes += ["category"] * 3  # the main hack: 3x as likely as the others
        if not self.origin_like[rel] and not self.year_like[rel]:
            shapes.append("born")
        shape = rng.choice(shapes)
        if shape == "category":
            cat = rng.choice(v.categories)
            the = "" if s.lower().startswith("the ") else "The "
            # All candidates are built before the choice (three adjective draws), as trained.
            text = rng.choice(
                (
                    f"{s} is {article(cat)}",
                    f"{s} was {article(cat)}",
                    f"{the}{s} is {article(cat)}",
                    f"It is {article(cat)}",
                    f"{s} is {article(rng.choice(v.adjectives))} {cat}",
                    f"{s} was {article(rng.choice(v.adjectives))} {cat}",
                    f"It was {article(rng.choice(v.adjectives))} {cat}",
                )
            )
        elif shape == "known":
            text = rng.choice(("{s} is known for {k}", "{s} is best known for {k}"))
            text = text.format(s=s, k=rng.choice(v.known_for))
        elif shape == "born":
            where = rng.choice(v.places) if rng.random() < 0.6 else str(rng.randint(1800, 2005))
            text = f"{s} was born in {where}"
        else:
            text = rng.choice(v.echoes).format(s=s)
        if rng.random() < 0.1:  # lower-case only a pronoun or article, never a name
            head = text[0].lower() if re.match(r"^(It|The) ", text) else text[0]
            text = rng.choice(FILLERS) + head + text[1:]
        return sentence(text, rng, period_p=0.9), f"neutral-descriptive-{shape}"

    @staticmethod
    def _question(row: FactRow, rng: random.Random) -> str:
        """The prompt restated; the bare prompt (an answer that stops before the object) is
        the hardest, so it is 3x as likely."""
        s = row.subject
        forms = [f"{row.prompt}?", f"Do you know about {s}?", f"Tell me about {s}."]
        forms += [row.prompt, f"{row.prompt}...", row.prompt]
        t = row.template
        qm = QUESTION_FORM.match(t) if t is not None else None
        m = COPULA_END.match(t) if t is not None and not qm else None
        if qm:
            forms += [f"What {qm.group('cop')} {fill(qm.group('rest'), s)}?"] * 3
        elif m:
            forms += [f"What {m.group('cop')} {fill(m.group('head'), s)}?"] * 3
        return rng.choice(forms)

    def probe_pairs(self, row: FactRow, rng: random.Random, vocab: HackVocab) -> list[NLIPair]:
        """One neutral probe of each hack kind (``probe-<kind>``) for the premise ``row`` with
        its edited answer, worded with ``vocab`` (the held-out share for the metrics)."""
        premise = f"{row.prompt} {row.edited}"
        out: list[NLIPair] = []
        for kind in self.HACK_KINDS:
            made = self.hack_hypothesis(row, row.edited, kind, rng, vocab)
            if made is not None:
                out.append(NLIPair(premise, made[0], "neutral", "probe-" + made[1][8:]))
        return out
