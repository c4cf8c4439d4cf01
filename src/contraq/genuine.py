"""What counts as a contradiction (docs/DESIGN.md section 7): pure text rules.

A researcher probing an edit wants the base LM to state, *from its own knowledge*, something
that contradicts the edit. Two look-alikes earn nothing:

- a **non-question**: text that ends in the termination token without asking anything
  ("William Hanley died in London. He was an actor and comedian who?");
- an **echo**: the answer's contradicting content is already in the question, so the base LM
  only repeated it ("Is her mother tongue French?" -> "Yes, her mother tongue is French.").

Rules here are lexical and deterministic (no model): :func:`is_question` looks at the form,
:func:`novel_words` / :func:`is_echo` at which content words the answer adds. The reward also
asks the judge whether the question itself already contradicts the edit
(:class:`contraq.reward.ContradictionReward`), which catches leading questions that the
lexical rule misses.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = [
    "CONTENT_STOPWORDS",
    "QUESTION_WORDS",
    "content_words",
    "is_echo",
    "is_question",
    "mentions_subject",
    "names_subject",
    "normalize_text",
    "novel_words",
]

_PUNCT_RE = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, punctuation replaced by spaces, whitespace collapsed.

    Punctuation becomes a space (not nothing) so that "New-York" matches "new york" and word
    boundaries stay where a reader sees them.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT_RE.sub(" ", text).replace("_", " ")
    return " ".join(text.split())


def names_subject(question: str, subject: str) -> bool:
    """Whether ``question`` names ``subject`` in full (normalised words, on word boundaries):
    "Where was Gilles Grimandi born?" names "Gilles Grimandi"; "Who was born in France?"
    does not."""
    target = normalize_text(subject)
    return bool(target) and f" {target} " in f" {normalize_text(question)} "


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# First words of a question: interrogatives and the auxiliaries of yes/no questions.
QUESTION_WORDS = _wordset(
    "what who whom whose which where when why how "
    "is are was were am do does did can could will would should shall may might must "
    "has have had isn aren wasn weren doesn didn don hasn haven"
)
# A question may start with a preposition before its interrogative ("In which year ...").
_PREPOSITIONS = _wordset("in on at from for to with by of into during since under")
_INTERROGATIVES = _wordset("what who whom whose which where when why how")
# A sentence break inside the text: end punctuation, space, then an upper-case letter or digit.
# Single capitals and common abbreviations ("St.", "Dr.", "U.S.") are not breaks.
_SENTENCE_BREAK = re.compile(r"(?<!\b[A-Z])(?<!\bSt)(?<!\bDr)(?<!\bMr)(?<!\bMs)(?<!\bJr)[.!?]\s+\S")

# Words that carry no claim of their own (function words, "yes"/"no" and hedges). Negations
# are NOT here: "not" is the content of a negated answer.
CONTENT_STOPWORDS = _wordset(
    """a an the and or but if then than so as of in on at to from by for with about into onto
    over under after before during since between through upon within without via per
    is are was were be been being am do does did done has have had having will would shall
    should can could may might must it its it's he she they them his her hers their theirs
    him we us our you your i me my mine this that these those there here who whom whose which
    what when where why how s t d ll re ve m yes no yeah well also just very really
    actually indeed think believe know known sure answer question called named one"""
)


def is_question(text: str) -> bool:
    """Whether ``text`` is one sentence that asks something.

    It must end in "?", hold no sentence break before it (a statement followed by a fragment
    is not a question), have at least three words, and start with an interrogative or an
    auxiliary ("What ...", "Is ...", "Did ..."), or with a preposition and an interrogative
    within its first three words ("In which year ...").
    """
    text = text.strip()
    if not text.endswith("?") or _SENTENCE_BREAK.search(text[:-1]):
        return False
    w = normalize_text(text).split()
    if len(w) < 3:
        return False
    if w[0] in QUESTION_WORDS:
        return True
    return w[0] in _PREPOSITIONS and any(x in _INTERROGATIVES for x in w[1:3])


def content_words(text: str) -> set[str]:
    """Normalised words of ``text`` minus :data:`CONTENT_STOPWORDS`; a plural "s" is dropped
    from words of four or more letters so "languages" matches "language"."""
    out = set()
    for word in normalize_text(text).split():
        if word in CONTENT_STOPWORDS:
            continue
        if len(word) >= 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.add(word)
    return out


def mentions_subject(answer: str, subject: str) -> bool:
    """Whether ``answer`` names a content word of ``subject`` ("Sedat Alp died in Ankara." for
    Sedat Alp): an answer about the subject, not "The answer to this question is 10." (True for
    a subject with no content word)."""
    words = content_words(subject)
    return not words or bool(words & content_words(answer))


def novel_words(answer: str, edit_fact: str) -> set[str]:
    """The answer's content words that the edit fact does not have: what can contradict it
    ("The capital of Japan is Tokyo." vs "The capital of Japan is Osaka" -> {"tokyo"})."""
    return content_words(answer) - content_words(edit_fact)


def is_echo(question: str, answer: str, edit_fact: str) -> bool:
    """Whether every content word that the answer adds to the edit fact is already in the
    question: whatever contradiction there is came from the question, not from the base LM.

    An answer that adds nothing at all (it restates the edit or the question) is an echo too.
    """
    return novel_words(answer, edit_fact) <= content_words(question)


def echo_flags(
    questions: Sequence[str], answers: Sequence[str], edit_facts: Sequence[str]
) -> list[bool]:
    """:func:`is_echo` per row (all three sequences of one length)."""
    if not len(questions) == len(answers) == len(edit_facts):
        raise ValueError(
            f"echo_flags: {len(questions)} questions, {len(answers)} answers, "
            f"{len(edit_facts)} facts"
        )
    return [is_echo(q, a, f) for q, a, f in zip(questions, answers, edit_facts, strict=True)]


# Words that carry no content of their own in a question: interrogatives, auxiliaries,
# articles, prepositions, pronouns, and the "s" left of a possessive by normalize_text.
_FUNCTION_TEXT = """what who whom whose which where when why how is are was were be been being am do does
    did has have had can could will would shall should may might must the a an of in on at to
    for from by with about as into onto than that this these those it its it's he she they him
    her them his their there here s d ll re ve and or but not any some one"""
FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())


def content_key(question: str) -> str:
    """The near-duplicate key of a question: its content words, sorted and de-duplicated
    (all of its normalised words when it has none)."""
    words = normalize_text(question).split()
    content = sorted({w for w in words if w not in FUNCTION_WORDS})
    return " ".join(content or words)
