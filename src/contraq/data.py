"""Edit facts: loading and validating JSON Lines, splitting by subject, building prompts.

File format: one JSON object per line with the fields ``prompt, subject, original_answer,
edited_answer, edit_fact, original_fact`` (extra fields such as CounterFact's ``case_id`` are
allowed and ignored). With ``minimal_ok=True`` only ``subject`` and ``edit_fact`` are required
(the schema of ``contraq sample facts=FILE``); the other fields are then optional.

Error policy (:func:`load_facts`):

- The file itself is wrong -> :class:`DataError` always: missing, a directory, not UTF-8,
  empty (no record), a line that is not JSON at all (a corrupt or non-JSONL file: skipping
  would silently train on part of it), or no valid record.
- A record is wrong (not a JSON object, a required field missing, not a string, empty,
  longer than ``max_chars`` characters (a prompt of a megabyte would stall sampling), null or
  ``"nan"``, or a fact ending in the word ``nan``, which is how a missing value was
  written into zsRE's facts) -> with ``on_error="skip"`` (the default) the row is skipped and
  ONE warning summarises all skipped rows; with ``on_error="raise"`` the first one raises.
  If more than half of the records are bad the file is rejected anyway (wrong schema or wrong
  file, not a few broken rows).

Every message names ``file:line: field: reason``. Blank lines are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contraq.errors import UserError
from contraq.files import resolve_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHAT_QUESTION_TEMPLATE",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_QUESTION_TEMPLATE",
    "FULL_FIELDS",
    "MINIMAL_FIELDS",
    "DataError",
    "EditFact",
    "FactSplit",
    "LoadReport",
    "SkippedRow",
    "encode_prompts",
    "load_facts",
    "load_split",
    "load_facts_report",
    "question_prompt",
    "split_facts",
    "subject_split",
]

logger = logging.getLogger(__name__)

FULL_FIELDS = (
    "prompt",
    "subject",
    "original_answer",
    "edited_answer",
    "edit_fact",
    "original_fact",
)
MINIMAL_FIELDS = ("subject", "edit_fact")
# A record is rejected as "mostly bad file" above this share of bad records.
MAX_BAD_SHARE = 0.5
# Longest accepted field (characters): far above any real fact, far below what stalls the LM.
DEFAULT_MAX_CHARS = 2000
# How many skipped rows the summary warning lists.
WARN_EXAMPLES = 5

DEFAULT_QUESTION_TEMPLATE = "Generate a question about {subject}:\nQuestion:"
# The request as a chat turn (the raw template's "Question:" cue is for raw LMs); the same
# text as `prompt.template` in configs/train.yaml.
DEFAULT_CHAT_QUESTION_TEMPLATE = "Ask one short question about {subject}."
TEMPLATE_KEYS = ("subject", "edit_fact", "prompt")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field where known."""

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


@dataclass(frozen=True, kw_only=True)
class EditFact:
    """One edit fact. Strings are whitespace-normalised (stripped, inner runs -> one space).

    Loaded with the full schema every field is a non-empty string; with the minimal schema
    (``load_facts(..., minimal_ok=True)``) ``prompt``, ``original_answer``, ``edited_answer``
    and ``original_fact`` may be ``None``. ``source`` and ``line`` (1-based) locate the record
    for error messages.
    """

    subject: str
    edit_fact: str
    prompt: str | None = None
    original_answer: str | None = None
    edited_answer: str | None = None
    original_fact: str | None = None
    source: str = "<memory>"
    line: int = 0

    @property
    def where(self) -> str:
        """``file:line`` of the record."""
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class SkippedRow:
    """A record that :func:`load_facts` skipped: where, which field (or ``<record>``) and why."""

    source: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.reason}"


@dataclass
class LoadReport:
    """Result of :func:`load_facts_report`: the valid facts and the skipped rows."""

    source: str
    facts: list[EditFact]
    skipped: list[SkippedRow] = field(default_factory=list)


@dataclass(frozen=True)
class FactSplit:
    """Facts split by subject. ``test`` is the held-out split that training never sees."""

    train: list[EditFact]
    val: list[EditFact]
    test: list[EditFact]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _check_string(
    value: Any, name: str, required: bool, max_chars: int = DEFAULT_MAX_CHARS
) -> tuple[str | None, str | None]:
    """(normalised value, None) or (None, reason). Optional fields may be absent or null."""
    if value is None:
        return None, ("is null" if required else None)
    if not isinstance(value, str):
        return None, f"must be a string, got {type(value).__name__}"
    if len(value) > max_chars:
        return None, (
            f"is {len(value)} characters long, more than the maximum {max_chars} "
            "(data.max_fact_chars)"
        )
    text = _normalise(value)
    if not text:
        return None, "is empty"
    if text.lower() == "nan":
        return None, "is 'nan' (a missing value)"
    if name in ("edit_fact", "original_fact") and text.lower().endswith(" nan"):
        return None, "ends in 'nan' (a missing value written into the fact)"
    return text, None


def _parse_record(
    record: Any, source: str, line: int, minimal_ok: bool, max_chars: int = DEFAULT_MAX_CHARS
) -> tuple[EditFact | None, SkippedRow | None]:
    if not isinstance(record, dict):
        return None, SkippedRow(
            source, line, "<record>", f"must be a JSON object, got {type(record).__name__}"
        )
    required = MINIMAL_FIELDS if minimal_ok else FULL_FIELDS
    values: dict[str, str | None] = {}
    for name in FULL_FIELDS:
        is_required = name in required
        if name not in record:
            if is_required:
                return None, SkippedRow(source, line, name, "missing")
            values[name] = None
            continue
        value, reason = _check_string(record[name], name, is_required, max_chars)
        if reason is not None:
            return None, SkippedRow(source, line, name, reason)
        values[name] = value
    return EditFact(**values, source=source, line=line), None  # type: ignore[arg-type]


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded JSON value)`` of each non-blank line (a BOM on line 1 is
    accepted); text that is not UTF-8 or not JSON raises :class:`DataError` naming the line."""
    source = str(path)
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{source}:{line_no}: not UTF-8 text ({exc})", source, line_no
                ) from exc
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{source}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line",
                    source,
                    line_no,
                ) from exc
            yield line_no, record


def load_facts_report(
    path: str | Path,
    *,
    on_error: Literal["skip", "raise"] = "skip",
    minimal_ok: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
    one_row_per_fact: bool = True,
) -> LoadReport:
    """Load and validate a JSON Lines file of edit facts (error policy: see the module doc).

    Args:
        path: the ``.jsonl`` file.
        on_error: ``skip`` (default: bad records are skipped, one summary warning is logged)
            or ``raise`` (the first bad record raises :class:`DataError`).
        minimal_ok: accept the minimal schema ``{subject, edit_fact}``.
        max_chars: longest accepted field, in characters (``data.max_fact_chars``).
        one_row_per_fact: warn about repeated facts (false for a questions file, whose rows
            repeat a fact once per question).

    Returns:
        :class:`LoadReport` with the facts in file order and the skipped rows.

    Raises:
        DataError: see the module docstring.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise DataError(f"{source}: facts file not found", source)
    if p.is_dir():
        raise DataError(f"{source}: is a directory, expected a JSON Lines file of facts", source)

    facts: list[EditFact] = []
    skipped: list[SkippedRow] = []
    n_records = 0
    for line_no, record in _json_records(p):
        n_records += 1
        fact, bad = _parse_record(record, source, line_no, minimal_ok, max_chars)
        if bad is not None:
            if on_error == "raise":
                raise DataError(str(bad), source, line_no, bad.field)
            skipped.append(bad)
        else:
            facts.append(fact)  # type: ignore[arg-type]

    if n_records == 0:
        raise DataError(f"{source}: empty file, no fact records", source)
    if not facts or len(skipped) > MAX_BAD_SHARE * n_records:
        examples = "; ".join(str(s) for s in skipped[:WARN_EXAMPLES])
        schema = "minimal {subject, edit_fact}" if minimal_ok else "full " + ", ".join(FULL_FIELDS)
        raise DataError(
            f"{source}: {len(skipped)} of {n_records} records are invalid for the {schema} "
            f"schema (wrong file or schema?), e.g. {examples}",
            source,
            skipped[0].line,
            skipped[0].field,
        )
    if skipped:
        examples = "; ".join(str(s) for s in skipped[:WARN_EXAMPLES])
        more = f" (and {len(skipped) - WARN_EXAMPLES} more)" if len(skipped) > WARN_EXAMPLES else ""
        logger.warning(
            "%s: skipped %d of %d records: %s%s", source, len(skipped), n_records, examples, more
        )
    if one_row_per_fact:
        _warn_duplicates(facts, source)
    return LoadReport(source=source, facts=facts, skipped=skipped)


def _warn_duplicates(facts: Sequence[EditFact], source: str) -> None:
    """A fact given twice is trained, evaluated and counted twice: say where."""
    first: dict[tuple[str, str], str] = {}
    repeats = []
    for f in facts:
        seen = first.setdefault((f.subject, f.edit_fact), f.where)
        if seen != f.where:
            repeats.append(f"{f.where} repeats {seen}")
    if repeats:
        logger.warning(
            "%s: %d duplicate facts (same subject and edit fact), e.g. %s",
            source, len(repeats), "; ".join(repeats[:WARN_EXAMPLES]),
        )  # fmt: skip


def load_facts(
    path: str | Path,
    *,
    on_error: Literal["skip", "raise"] = "skip",
    minimal_ok: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
    one_row_per_fact: bool = True,
) -> list[EditFact]:
    """The valid facts of ``path`` (see :func:`load_facts_report` for the skipped rows)."""
    return load_facts_report(
        path,
        on_error=on_error,
        minimal_ok=minimal_ok,
        max_chars=max_chars,
        one_row_per_fact=one_row_per_fact,
    ).facts


def stable_unit(key: str) -> float:
    """A stable number in [0, 1) per ``key``: blake2b, never the salted ``hash()``, so it is the
    same in every process and run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _subject_unit(subject: str, seed: int) -> float:
    return stable_unit(f"{seed}\x00{subject}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must lie in [0, 1), got {val_fraction}, {test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (train would be empty), got "
            f"{val_fraction} + {test_fraction}"
        )


def subject_split(
    subject: str, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> Literal["train", "val", "test"]:
    """The split of one subject: ``test`` if its unit digest is below ``test_fraction``, then
    ``val`` below ``test_fraction + val_fraction``, else ``train``."""
    _check_fractions(val_fraction, test_fraction)
    u = _subject_unit(subject, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_facts(
    facts: Sequence[EditFact], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> FactSplit:
    """Split facts by subject: every fact of a subject lands in the same split.

    Each subject's split depends only on (subject, seed) through a blake2b digest, so it is the
    same in every process and run, and a subject never changes split when other rows are added,
    skipped or filtered. The fractions are therefore expected shares of *subjects*, not exact
    counts (and not shares of facts: subjects have different numbers of facts). Order within a
    split follows ``facts``.

    Raises:
        ValueError: fractions outside [0, 1) or summing to >= 1.
    """
    _check_fractions(val_fraction, test_fraction)
    parts: dict[str, list[EditFact]] = {"train": [], "val": [], "test": []}
    cache: dict[str, str] = {}
    for fact in facts:
        name = cache.get(fact.subject)
        if name is None:
            name = cache[fact.subject] = subject_split(
                fact.subject, val_fraction, test_fraction, seed
            )
        parts[name].append(fact)
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not parts[name] and facts:
            logger.warning(
                "split_facts: the %s split is empty (%d subjects, fraction %.3g)",
                name,
                len(cache),
                fraction,
            )
    return FactSplit(train=parts["train"], val=parts["val"], test=parts["test"])


def load_split(cfg: Any) -> FactSplit:
    """The facts of the ``data`` config group split by subject.

    Args:
        cfg: ``path`` (see :func:`contraq.files.resolve_path`), ``val_fraction``, ``test_fraction``,
            ``split_seed`` and ``max_fact_chars`` (``contraq.config.schema.DataConfig`` or its
            DictConfig).
    """
    max_chars = int(getattr(cfg, "max_fact_chars", DEFAULT_MAX_CHARS))  # older run configs lack it
    facts = load_facts(resolve_path(cfg.path), max_chars=max_chars)
    return split_facts(
        facts,
        val_fraction=float(cfg.val_fraction),
        test_fraction=float(cfg.test_fraction),
        seed=int(cfg.split_seed),
    )


def _template_values(fact: EditFact, template: str) -> dict[str, str]:
    keys = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = sorted(keys - set(TEMPLATE_KEYS))
    if unknown:
        raise ValueError(
            f"prompt template {template!r} uses {unknown}; allowed: {{subject}}, {{edit_fact}}, "
            "{prompt}"
        )
    # A minimal {subject, edit_fact} fact has no cloze prompt: its edit fact names the same
    # subject and relation, so it stands in for {prompt}.
    prompt = fact.prompt if fact.prompt is not None else fact.edit_fact
    values = {"subject": fact.subject, "edit_fact": fact.edit_fact, "prompt": prompt}
    return {k: v for k, v in values.items() if k in keys}  # type: ignore[misc]


def question_prompt(
    fact: EditFact,
    template: str | None = None,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The text that asks the LM for a question about ``fact``.

    Raw LMs get ``template`` filled in (default :data:`DEFAULT_QUESTION_TEMPLATE`); instruct LMs
    get it as one user turn through ``tokenizer.apply_chat_template(...,
    add_generation_prompt=True, tokenize=False)`` (default :data:`DEFAULT_CHAT_QUESTION_TEMPLATE`).
    The template may use ``{subject}``, ``{edit_fact}`` and ``{prompt}`` (a fact without a
    prompt, the minimal schema, fills ``{prompt}`` with its ``edit_fact``).

    Raises:
        ValueError: unknown template key, or a chat template
            requested from a tokenizer that has none.
    """
    if template is None:
        template = (
            DEFAULT_CHAT_QUESTION_TEMPLATE if use_chat_template else DEFAULT_QUESTION_TEMPLATE
        )
    text = template.format(**_template_values(fact, template))
    if not use_chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "use_chat_template=True needs a tokenizer with a chat template "
            f"(got {type(tokenizer).__name__})"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def _starts_with_special(text: str, tokenizer: Any) -> bool:
    return any(tok and text.startswith(tok) for tok in getattr(tokenizer, "all_special_tokens", []))


def encode_prompts(
    texts: Sequence[str], tokenizer: Any, add_special_tokens: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts, LEFT-padded (the tokenizer's ``padding_side`` is not touched).

    Args:
        texts: ``B`` prompt strings.
        tokenizer: a Hugging Face tokenizer; pads with ``pad_token_id`` (else ``eos_token_id``).
        add_special_tokens: ``None`` (default) decides per text: a text that already starts
            with a special token (a chat-templated prompt) is tokenised with
            ``add_special_tokens=False``, as ``apply_chat_template(tokenize=True)`` does, so no
            BOS is added twice; other texts get the tokenizer's usual special tokens.

    Returns:
        ``ids: LongTensor[B, P]``, ``mask: LongTensor[B, P]`` (1 on real tokens, on the CPU).

    Raises:
        ValueError: no texts, an empty prompt, or a tokenizer without pad and eos tokens.
    """
    import torch  # here, not at the top: loading facts should not need torch's import time

    if not texts:
        raise ValueError("encode_prompts: no texts")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("encode_prompts: the tokenizer has neither a pad nor an eos token")
    rows: list[list[int]] = []
    for i, text in enumerate(texts):
        special = (
            not _starts_with_special(text, tokenizer)
            if add_special_tokens is None
            else add_special_tokens
        )
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:
            raise ValueError(f"encode_prompts: text {i} gives no tokens: {text!r}")
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask_t = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids_t[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask_t[i, width - len(r) :] = 1
    return ids_t, mask_t
