"""The word lists and phrase templates of the synthetic pairs, read from ``tables/*.json``.

``tables/hack_vocab.json`` holds the words of the reward-hack neutrals (:class:`HackVocab`),
``tables/phrases.json`` the fillers, answer templates and the relation words that decide which
neutral shapes apply, ``tables/hand_probes.json`` the hand-written probes scored after training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

SUBJECT_SLOT = "\x00"  # subject slot in a template (never occurs in the data)


@cache
def load_table(name: str) -> Any:
    """The parsed ``tables/<name>.json`` shipped in this package."""
    return json.loads((files("contraq.judge") / "tables" / f"{name}.json").read_text("utf-8"))


def _words_regex(words: list[str]) -> str:
    return r"\b(" + "|".join(words) + r")\b"


_HACK = load_table("hack_vocab")
_PHRASES = load_table("phrases")

CATEGORIES: tuple[str, ...] = tuple(_HACK["categories"])
FILLERS: tuple[str, ...] = tuple(_PHRASES["fillers"])
SHORT_FORMS: tuple[str, ...] = tuple(_PHRASES["short_forms"])  # {o}: the object
ROLE_FORMS: tuple[str, ...] = tuple(_PHRASES["role_forms"])  # {s}: subject, {a}: "a <object>"
OVERLAP_NAMES: tuple[str, ...] = tuple(_PHRASES["overlap_names"])  # {o}: an object of the fact

# Relations answered by a category noun ("X's occupation was judge" vs "X is a lawyer"): there
# an "is a <category>" answer DOES address the relation, so no descriptive neutral is built.
CATEGORY_RELATION = re.compile(
    _words_regex(_PHRASES["category_relation_words"]) + rf"|^{SUBJECT_SLOT}, the$",
    re.IGNORECASE,
)
# Relations answered by a birth place or origin: "X was born in <place>" may address them.
ORIGIN_RELATION = re.compile(_words_regex(_PHRASES["origin_relation_words"]), re.IGNORECASE)
# Relations whose object is a role noun: "X was a lawyer" answers "X's occupation was judge".
ROLE_RELATION = re.compile(_words_regex(_PHRASES["role_relation_words"]), re.IGNORECASE)
# Verbs that negate as "does not <verb>" (see forms.negate).
NEGATABLE_VERB = re.compile(_words_regex(_PHRASES["negatable_verbs"]))


@dataclass(frozen=True)
class HackVocab:
    """Word lists of the reward-hack neutrals (training or held-out share)."""

    categories: tuple[str, ...]
    adjectives: tuple[str, ...]
    known_for: tuple[str, ...]
    echoes: tuple[str, ...]  # "{s}": the subject
    non_answers: tuple[str, ...]
    famous_subjects: tuple[str, ...]
    places: tuple[str, ...]


def full_hack_vocab() -> HackVocab:
    """All entries of ``tables/hack_vocab.json``."""
    return HackVocab(**{k: tuple(_HACK[k]) for k in HackVocab.__dataclass_fields__})


def split_hack_vocab() -> tuple[HackVocab, HackVocab]:
    """(training vocabulary, held-out vocabulary): every 5th entry of each list is held out,
    so the probes measure generalisation to unseen categories, phrasings and subjects."""
    full = full_hack_vocab()

    def part(items: tuple[str, ...], held: bool) -> tuple[str, ...]:
        return tuple(x for i, x in enumerate(items) if (i % 5 == 4) == held)

    names = HackVocab.__dataclass_fields__
    train_vocab, held_vocab = (
        HackVocab(**{k: part(getattr(full, k), h) for k in names}) for h in (False, True)
    )
    return train_vocab, held_vocab


def hand_probes() -> tuple[tuple[str, str, str], ...]:
    """Hand-written (premise, hypothesis, expected label) probes scored into ``metrics.json``
    (``probe_scores``): the two known reward hacks and the flagship contradiction."""
    return tuple((p, h, y) for p, h, y in load_table("hand_probes"))
