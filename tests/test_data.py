"""Edit facts: validation with file/line/field messages, the subject split, prompts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contraq.data import (
    DEFAULT_QUESTION_TEMPLATE,
    DataError,
    EditFact,
    encode_prompts,
    load_facts,
    load_facts_report,
    question_prompt,
    split_facts,
    subject_split,
)

REPO = Path(__file__).resolve().parents[1]
ZSRE = REPO / "data" / "zsre_1000.jsonl"
COUNTERFACT = REPO / "data" / "counterfact_1000.jsonl"
ZSRE_BROKEN_LINES = [222, 223, 230, 326, 349, 510, 894, 908]


def good_record(i: int = 0, **changes) -> dict:
    rec = {
        "prompt": f"The capital of Country{i} is",
        "subject": f"Country{i}",
        "original_answer": "Paris",
        "edited_answer": "Rome",
        "edit_fact": f"The capital of Country{i} is Rome",
        "original_fact": f"The capital of Country{i} is Paris",
    }
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not ...}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


# ------------------------------------------------------------------------------ real files
def test_zsre_skips_exactly_the_eight_broken_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="contraq.data"):
        report = load_facts_report(ZSRE)
    assert [s.line for s in report.skipped] == ZSRE_BROKEN_LINES
    assert all(s.field == "edited_answer" and s.reason == "is null" for s in report.skipped)
    assert len(report.facts) == 1000 - 8
    # one summary warning with the count and the first rows as file:line: field: reason (and
    # one more naming the file's 6 repeated facts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "duplicate facts" in warnings[1].getMessage()
    msg = warnings[0].getMessage()
    assert "skipped 8 of 1000" in msg
    assert f"{ZSRE}:222: edited_answer: is null" in msg
    # whitespace normalised (line 2 has " Colt Motorcycles" and a double space in edit_fact)
    line2 = next(f for f in report.facts if f.line == 2)
    assert line2.edited_answer == "Colt Motorcycles"
    assert line2.edit_fact == "The company that manufactured Colt King Cobra is Colt Motorcycles"
    assert line2.source == str(ZSRE)
    for f in report.facts:
        for value in (f.prompt, f.subject, f.original_answer, f.edited_answer, f.edit_fact):
            assert value == " ".join(value.split()) and value


def test_zsre_raise_names_the_first_broken_row():
    with pytest.raises(DataError, match=r"zsre_1000\.jsonl:222: edited_answer: is null") as info:
        load_facts(ZSRE, on_error="raise")
    assert (info.value.line, info.value.field) == (222, "edited_answer")


def test_counterfact_loads_with_extra_field():
    report = load_facts_report(COUNTERFACT)
    assert len(report.facts) == 1000 and not report.skipped
    assert report.facts[0].subject == "Danielle Darrieux"
    assert report.facts[0].edited_answer == "English"


# ------------------------------------------------------------------------------ failure modes
@pytest.mark.parametrize(
    "bad, field, reason",
    [
        (good_record(edited_answer=None), "edited_answer", "is null"),
        (good_record(edited_answer="nan"), "edited_answer", "'nan'"),
        (good_record(edited_answer="   "), "edited_answer", "is empty"),
        (good_record(subject=...), "subject", "missing"),
        (good_record(prompt=3), "prompt", "must be a string, got int"),
        (good_record(edit_fact="Country0 is nan"), "edit_fact", "ends in 'nan'"),
        ([1, 2, 3], "<record>", "must be a JSON object, got list"),
    ],
)
def test_bad_record_skip_and_raise(tmp_path, bad, field, reason):
    path = write_lines(tmp_path / "f.jsonl", [good_record(0), good_record(1), bad, good_record(3)])
    report = load_facts_report(path)
    assert [f.line for f in report.facts] == [1, 2, 4]
    assert len(report.skipped) == 1
    s = report.skipped[0]
    assert (s.source, s.line, s.field) == (str(path), 3, field)
    assert reason in s.reason
    with pytest.raises(DataError) as info:
        load_facts(path, on_error="raise")
    text = str(info.value)
    assert text.startswith(f"{path}:3: {field}: ") and reason in text


def test_non_json_line_is_an_error_even_when_skipping(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [good_record(0), "{not json", good_record(2)])
    with pytest.raises(DataError, match=r"f\.jsonl:2: not valid JSON") as info:
        load_facts(path)
    assert info.value.line == 2


def test_missing_empty_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_facts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_facts(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        load_facts(empty)


def test_mostly_bad_file_is_rejected(tmp_path):
    # every record has the wrong schema: an error, not "skip everything"
    path = write_lines(tmp_path / "f.jsonl", [{"premise": "a", "hypothesis": "b"}] * 3)
    with pytest.raises(DataError, match=r"3 of 3 records are invalid.*f\.jsonl:1: prompt: missing"):
        load_facts(path)
    # more than half bad
    path = write_lines(
        tmp_path / "g.jsonl", [good_record(0), good_record(1, edited_answer=None), {"x": 1}]
    )
    with pytest.raises(DataError, match="2 of 3 records are invalid"):
        load_facts(path)


def test_blank_lines_and_bom_are_tolerated(tmp_path):
    path = tmp_path / "f.jsonl"
    body = json.dumps(good_record(0)) + "\n\n" + json.dumps(good_record(1)) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [f.line for f in load_facts(path)] == [1, 3]


def test_minimal_schema(tmp_path):
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            {"subject": "Lyon", "edit_fact": "The twin city of Lyon is  Manila "},
            {"subject": "Rome", "edit_fact": "Rome is in France", "original_answer": "Italy"},
            good_record(2),
        ],
    )
    facts = load_facts(path, minimal_ok=True)
    assert facts[0] == EditFact(
        subject="Lyon", edit_fact="The twin city of Lyon is Manila", source=str(path), line=1
    )
    assert facts[0].original_answer is None and facts[0].prompt is None
    assert facts[1].original_answer == "Italy"
    assert facts[2].edited_answer == "Rome"
    # the full schema rejects minimal rows
    with pytest.raises(DataError, match=r"m\.jsonl:1: prompt: missing"):
        load_facts(path, on_error="raise")


# ------------------------------------------------------------------------------ split
def test_split_by_subject():
    facts = load_facts(ZSRE)
    split = split_facts(facts, val_fraction=0.1, test_fraction=0.1, seed=0)
    parts = {"train": split.train, "val": split.val, "test": split.test}
    subjects = {name: {f.subject for f in fs} for name, fs in parts.items()}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    assert sum(len(fs) for fs in parts.values()) == len(facts)
    n_subj = sum(len(s) for s in subjects.values())
    for name in ("val", "test"):  # about 10% of the subjects each
        assert 0.05 * n_subj < len(subjects[name]) < 0.15 * n_subj
    # order within a split follows the input
    assert [f.line for f in split.test] == sorted(f.line for f in split.test)
    # another seed gives another split
    other = split_facts(facts, seed=1)
    assert {f.subject for f in other.test} != subjects["test"]


def test_split_is_stable_under_filtering_and_pinned():
    facts = load_facts(ZSRE)
    full = split_facts(facts)
    half = split_facts(facts[::2])
    assert {f.line for f in half.test} <= {f.line for f in full.test}
    # pinned: changing the digest scheme would silently change the held-out set
    pinned = {
        "Colt King Cobra": "train",
        "273 Atropos": "train",
        "Air West Coast": "val",
        "Angelo Maria Amorevoli": "val",
        "Abraham Acton": "test",
        "Acantuerta": "test",
    }
    assert {s: subject_split(s) for s in pinned} == pinned
    assert len({f.subject for f in full.test}) == 65 and len(full.test) == 111


SPLIT_SCRIPT = """
import json, sys
from contraq.data import load_facts, split_facts
s = split_facts(load_facts(sys.argv[1]), 0.1, 0.1, 0)
print(json.dumps([[f.line for f in part] for part in (s.train, s.val, s.test)]))
"""


def test_split_stable_across_processes():
    here = split_facts(load_facts(ZSRE), 0.1, 0.1, 0)
    want = [[f.line for f in part] for part in (here.train, here.val, here.test)]
    # a hash seed other than this process's: Python's salted hash() would change the split
    other = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT, str(ZSRE)],
        env={**os.environ, "PYTHONHASHSEED": other},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == want


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="< 1"):
        split_facts([], val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_facts([], val_fraction=-0.1)


# ------------------------------------------------------------------------------ prompts
FACT = EditFact(
    subject="Colt King Cobra",
    edit_fact="The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
    prompt="The manufacturer of Colt King Cobra was",
)


def test_raw_question_prompt_and_template_keys():
    assert question_prompt(FACT) == "Generate a question about Colt King Cobra:\nQuestion:"
    assert question_prompt(FACT, DEFAULT_QUESTION_TEMPLATE) == question_prompt(FACT)
    text = question_prompt(FACT, "Fact: {edit_fact}\nAbout {subject} ({prompt})?")
    assert text == (
        "Fact: The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation\n"
        "About Colt King Cobra (The manufacturer of Colt King Cobra was)?"
    )
    with pytest.raises(ValueError, match="object"):
        question_prompt(FACT, "About {object}")
    # A minimal {subject, edit_fact} fact: its edit fact stands in for {prompt} (issue 9).
    assert question_prompt(EditFact(subject="X", edit_fact="X is Y"), "{prompt} ...") == (
        "X is Y ..."
    )
    with pytest.raises(ValueError, match="chat template"):
        question_prompt(FACT, use_chat_template=True)


@pytest.mark.slow
def test_chat_prompt_and_left_padding(smol_tokenizer):
    tok = smol_tokenizer
    chat = question_prompt(FACT, tokenizer=tok, use_chat_template=True)
    assert "Ask one short question about Colt King Cobra." in chat
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    raw = question_prompt(FACT)
    side_before = tok.padding_side
    ids, mask = encode_prompts([raw, chat], tok)
    assert tok.padding_side == side_before  # the caller's tokenizer is not modified
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    # left padding: real tokens are right-aligned
    n_raw = int(mask[0].sum())
    assert mask[1].all() and mask[0, -n_raw:].all() and not mask[0, :-n_raw].any()
    assert (ids[0, :-n_raw] == tok.pad_token_id).all()
    # exactly the tokenisation that apply_chat_template(tokenize=True) gives: no second BOS
    want = tok.apply_chat_template(
        [{"role": "user", "content": "Ask one short question about Colt King Cobra."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(want, dict) or hasattr(want, "keys"):
        want = want["input_ids"]
    assert ids[1].tolist() == list(want)
    assert ids[1].tolist().count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids[0, -n_raw:].tolist() == tok(raw)["input_ids"]
    with pytest.raises(ValueError, match="no texts"):
        encode_prompts([], tok)


def test_overlong_fields_are_refused_at_load_with_file_and_line(tmp_path: Path) -> None:
    # Issue 9, case 8: a megabyte prompt used to stall `contraq sample` for minutes.
    path = write_lines(
        tmp_path / "f.jsonl",
        [good_record(0), good_record(1, prompt="x" * 2**20), good_record(2), good_record(3)],
    )
    report = load_facts_report(path)
    assert [f.subject for f in report.facts] == ["Country0", "Country2", "Country3"]
    assert str(report.skipped[0]).startswith(f"{path}:2: prompt: is 1048576 characters long")
    with pytest.raises(DataError, match=r"f\.jsonl:2: prompt: .*maximum 2000"):
        load_facts(path, on_error="raise")
    with pytest.raises(DataError, match=r"f\.jsonl:1: prompt: .*maximum 10"):
        load_facts(path, on_error="raise", max_chars=10, minimal_ok=True)


def test_duplicate_facts_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 28 case 9: a fact listed twice was trained and counted twice without a word."""
    row = {"subject": "Paris", "edit_fact": "Paris is in Italy"}
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row, {**row, "subject": "Rome"}, row)))
    with caplog.at_level(logging.WARNING, logger="contraq.data"):
        facts = load_facts(path, minimal_ok=True)
    assert len(facts) == 3  # kept: the user decides
    (warning,) = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert "1 duplicate facts" in warning and f"{path}:3 repeats {path}:1" in warning


def _zsre_questions_script():
    """scripts/zsre_questions.py, loaded from its file (a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "zsre_questions.py"
    spec = importlib.util.spec_from_file_location("zsre_questions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("question", "answer", "fact"),
    [
        (
            "What is the product made by UniFirst?",
            "unmanned aircraft",
            "The product made by UniFirst is unmanned aircraft.",
        ),
        (
            "Who was the designor of  Albert House ?",
            " Frank Gehry",
            "The designor of Albert House was Frank Gehry.",
        ),
        ("When was WEFS established?", "1997", "When was WEFS established? 1997."),
        ("What is Magic Slim's career?", "musician", "What is Magic Slim's career? musician."),
    ],
)
def test_zsre_question_and_new_answer_make_an_edit_fact(question, answer, fact):
    assert _zsre_questions_script().qa_edit_fact(question, answer) == fact


def test_zsre_questions_file_gives_question_then_paraphrase_and_loads(tmp_path, caplog):
    """Two rows per fact with an edited answer (a null one is skipped), readable by
    `contraq eval questions=FILE` (contraq.evaluation.question_file.load_questions), which
    expects a fact's rows to repeat it and does not warn about duplicate facts."""
    from contraq.evaluation.question_file import load_questions

    mod = _zsre_questions_script()
    records = [
        {
            "id": 0,
            "subject": "UniFirst",
            "question": "What is the product made by UniFirst?",
            "rephrase": "What will be the product of UniFirst?",
            "original_answer": "uniform",
            "edited_answer": "unmanned aircraft",
        },
        {
            "id": 1,
            "subject": "X",
            "question": "Who is X?",
            "rephrase": "Who's X?",
            "original_answer": "a",
            "edited_answer": None,
        },
        {
            "id": 2,
            "subject": "WEFS",
            "question": "When was WEFS established?",
            "rephrase": "When has WEFS been established?",
            "original_answer": "1990",
            "edited_answer": "1997",
        },
    ]
    rows = mod.question_rows(records, first=5)
    assert [(r["id"], r["source"]) for r in rows] == [
        (0, "question"),
        (0, "rephrase"),
        (2, "question"),
        (2, "rephrase"),
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        facts, questions = load_questions(path)
    assert not [r for r in caplog.records if "duplicate" in r.getMessage()]
    assert [f.subject for f in facts] == ["UniFirst", "WEFS"]
    assert questions[0] == [
        "What is the product made by UniFirst?",
        "What will be the product of UniFirst?",
    ]
