"""Surface forms of a fact ``(template, subject, object)``: the wordings of the hypotheses.

A template is an edit prompt with its subject replaced by :data:`SUBJECT_SLOT` ("The capital
of \\x00 is"); the forms below name subject, relation and object explicitly, with a pronoun,
as a bare answer or as a role ("X was a lawyer"), and :func:`negate` turns a statement into
its negation.
"""

from __future__ import annotations

import random
import re

from contraq.judge.vocab import NEGATABLE_VERB, ROLE_FORMS, ROLE_RELATION, SHORT_FORMS, SUBJECT_SLOT

COPULA_END = re.compile(r"^(?P<head>.*\S)\s+(?P<cop>is|was|are|were)$")
QUESTION_FORM = re.compile(
    r"^(?:what|which|who|where) (?:is|was|are|were) (?P<rest>.+)\? (?:it|they|he|she) "
    r"(?P<cop>is|was|are|were)$",
    re.IGNORECASE,
)
YEAR = re.compile(r"\b\d{3,4}\b")
_COPULA = re.compile(r"\b(is|was|are|were)\b")
_SWAP_TENSE = {"is": "was", "was": "is", "are": "were", "were": "are"}


def clean(text: str) -> str:
    """Whitespace collapsed to single spaces."""
    return " ".join(str(text).split())


def sentence(text: str, rng: random.Random, period_p: float = 0.85) -> str:
    """``text`` capitalised, ending in a period with probability ``period_p``."""
    text = clean(text)
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?" and rng.random() < period_p:
        text += "."
    return text


def _swap_tense(text: str) -> str:
    return _COPULA.sub(lambda m: _SWAP_TENSE[m.group(1)], text)


def fill(template: str, subject: str) -> str:
    """``template`` with its subject slot filled."""
    return template.replace(SUBJECT_SLOT, subject)


def article(noun: str) -> str:
    """``noun`` with its indefinite article ("an actor", "a university")."""
    return ("an " if noun[0].lower() in "aeiou" and not noun.startswith("uni") else "a ") + noun


def role_object(obj: str) -> bool:
    """Whether ``obj`` may be a role noun (a few words, no year)."""
    return len(obj.split()) <= 4 and not YEAR.search(obj)


def negate(text: str) -> str:
    """A negated statement: "not" after the first copula ("The capital of X is not Y"), else
    "does not" before a common verb, else "It is not true that ..."."""
    if _COPULA.search(text):
        return _COPULA.sub(lambda m: f"{m.group(1)} not", text, count=1)
    m = NEGATABLE_VERB.search(text)
    if m:
        verb = m.group(1)
        past = verb.endswith("ed") or verb in ("spoke", "made")
        base = {"spoke": "speak", "made": "make"}.get(verb, verb[:-2] if past else verb[:-1])
        aux = "did not" if past else "does not"
        return text[: m.start()] + f"{aux} {base}" + text[m.end() :]
    head = text[0].lower() if re.match(r"^(The|It|A|An|His|Her|Its|Their) ", text) else text[0]
    return "It is not true that " + head + text[1:]


def _copula_forms(template: str, subject: str, obj: str) -> list[str]:
    """Explicit forms of a template ending in a copula ("The capital of _ is")."""
    m = COPULA_END.match(template)
    if not m:
        return []
    head, cop = m.group("head"), m.group("cop")
    inv = re.sub(r"^the name of (the )?", "the ", head, flags=re.IGNORECASE)
    if inv[:4].lower() == "the ":
        inv = "the " + inv[4:]
    forms = [f"{obj} {cop} {fill(inv, subject)}", f"{obj} {_SWAP_TENSE[cop]} {fill(inv, subject)}"]
    pm = re.match(rf"^the (.+?) (?:of|for) {SUBJECT_SLOT}$", head, re.IGNORECASE)
    if pm:
        forms.append(f"{subject}'s {pm.group(1)} {cop} {obj}")
    pm = re.match(rf"^{SUBJECT_SLOT}'s (.+)$", head)
    if pm:
        forms.append(f"The {pm.group(1)} of {subject} {cop} {obj}")
        forms.append(f"{obj} {cop} the {pm.group(1)} of {subject}")
    # "X's occupation was judge" -> "X was a judge": the descriptive shape that DOES
    # address a category relation (its contrast with the descriptive neutrals).
    if ROLE_RELATION.search(head) and (len(obj.split()) <= 3 and not YEAR.search(obj)):
        forms.append(f"{subject} {cop} {article(obj)}")
    return forms


def _clause_rest(rest: str) -> str:
    """The verb phrase of a "_, who is a citizen of" template ("is a citizen of")."""
    rest = re.sub(r"^(who|which|that) ", "", rest)
    if not re.match(r"^(is|was|are|were|has|had) ", rest):
        rest = "is " + rest
    return rest


def explicit_forms(template: str | None, prompt: str, subject: str, obj: str) -> list[str]:
    """Statements naming subject, relation and object, e.g. for template "The capital of _ is":
    "The capital of France is Paris", "The capital of France was Paris", "Paris is the
    capital of France", "France's capital is Paris"."""
    base = fill(template, subject) if template is not None else prompt
    forms = [f"{base} {obj}", _swap_tense(f"{base} {obj}")]
    if template is None:
        return forms
    qm = QUESTION_FORM.match(template)
    if qm:  # "What is the twin city of _? It is" -> "the twin city of Lyon is Manila"
        rest, cop = fill(qm.group("rest"), subject), qm.group("cop")
        forms += [f"{rest} {cop} {obj}", f"{obj} {cop} {rest}"]
    else:
        forms += _copula_forms(template, subject, obj)
    # CounterFact's "X, located in" / "X, who is a citizen of"
    if template.startswith(SUBJECT_SLOT + ", "):
        rest = template[len(SUBJECT_SLOT) + 2 :]
        if rest.startswith("whose "):
            forms.append(f"{subject}'s {rest[6:]} {obj}")
        else:
            forms.append(f"{subject} {_clause_rest(rest)} {obj}")
    return forms


def pronoun_forms(template: str | None, obj: str) -> list[str]:
    """The statement with the subject replaced by a pronoun ("It was made by A", "His
    occupation was A", "Its manufacturer is A")."""
    if template is None:
        return []
    forms: list[str] = []
    qm = QUESTION_FORM.match(template)
    if qm:
        cop = qm.group("cop")
        return [f"It {cop} {obj}", f"It {_SWAP_TENSE[cop]} {obj}"]
    if template.startswith(SUBJECT_SLOT + ", "):
        rest = template[len(SUBJECT_SLOT) + 2 :]
        if rest.startswith("whose "):
            forms += [f"{p} {rest[6:]} {obj}" for p in ("Its", "His", "Her")]
        else:
            forms += [f"{p} {_clause_rest(rest)} {obj}" for p in ("It", "He", "She")]
    elif template.startswith(SUBJECT_SLOT + "'s "):
        rest = template[len(SUBJECT_SLOT) + 3 :]
        forms += [f"{p} {rest} {obj}" for p in ("Its", "His", "Her", "Their")]
    elif template.startswith(SUBJECT_SLOT + " "):
        rest = template[len(SUBJECT_SLOT) + 1 :]
        forms += [f"{p} {rest} {obj}" for p in ("It", "He", "She")]
    elif re.match(rf"^the {SUBJECT_SLOT} ", template, re.IGNORECASE):
        forms.append(f"It {template[len(SUBJECT_SLOT) + 5 :]} {obj}")
    pm = re.match(
        rf"^the (.+?) (?:of|for) {SUBJECT_SLOT} (is|was|are|were)$", template, re.IGNORECASE
    )
    if pm:
        forms += [f"{p} {pm.group(1)} {pm.group(2)} {obj}" for p in ("Its", "His", "Her")]
    if not forms:
        forms.append(f"{template.replace(SUBJECT_SLOT, 'it')} {obj}")
    return forms


def role_forms(subject: str, obj: str) -> list[str]:
    """Descriptive statements of a role relation ("X was a lawyer", "He worked as a lawyer"):
    the shape of the descriptive neutrals, here addressing the relation."""
    return [t.format(s=subject, a=article(obj)) for t in ROLE_FORMS]


def short_forms(obj: str) -> list[str]:
    """Bare answers: "A", "It is A", "The answer is A", ..."""
    return [t.format(o=obj) for t in SHORT_FORMS]
