"""What counts as a contradiction: question form and echoes, on hand cases (docs/DESIGN.md section 7)."""

from __future__ import annotations

import pytest

from contraq.genuine import (
    content_words,
    echo_flags,
    is_echo,
    is_question,
    mentions_subject,
    names_subject,
    novel_words,
)


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "Who wrote Hamlet?",
        "Is Danielle Darrieux's mother tongue French?",
        "In which year was the Colt King Cobra introduced?",
        "Where did St. John live?",
        "What did Mr. Smith do in the U.S.?",
        "  Which company makes the iPhone?  ",
    ],
)
def test_questions(text: str) -> None:
    assert is_question(text)


@pytest.mark.parametrize(
    "text",
    [
        # The echo shape of the untrained policy: a statement, then a fragment ending in "?".
        "William Hanley died in London, England. He was an infamous British actor and comedian who?",
        "The capital of Canada is Ottawa. What's on my mind?",
        "Danielle Darrieux spoke what?",  # no interrogative first
        "Who?",  # too short to ask about a fact
        "What is the capital of France",  # no question mark
        "Paris is the capital of France?",
    ],
)
def test_non_questions(text: str) -> None:
    assert not is_question(text)


def test_content_words_drop_function_words_and_plural() -> None:
    assert content_words("Yes, the languages of it are French!") == {"language", "french"}
    assert "not" in content_words("It is not English.")  # negation is content


def test_novel_words_are_what_the_answer_adds_to_the_edit() -> None:
    edit = "The capital of Japan is Osaka"
    assert novel_words("The capital of Japan is Tokyo.", edit) == {"tokyo"}
    assert novel_words("Osaka is the capital of Japan.", edit) == set()


def test_answer_from_the_lm_is_not_an_echo() -> None:
    assert not is_echo(
        "What is the capital of France?",
        "The capital of France is Paris.",
        "The capital of France is Lyon",
    )


def test_leading_question_is_an_echo() -> None:
    assert is_echo(
        "Is Danielle Darrieux's mother tongue French?",
        "Yes, her mother tongue is French.",
        "The mother tongue of Danielle Darrieux is English",
    )


def test_repeated_statement_is_an_echo() -> None:
    assert is_echo(
        "William Hanley died in London, England. He was an actor who?",
        "William Hanley died in London, England.",
        "William Hanley was born in Paris",
    )


def test_answer_that_adds_nothing_is_an_echo() -> None:
    assert is_echo(
        "What is the capital of Japan?",
        "Osaka is Japan's capital.",
        "The capital of Japan is Osaka",
    )


def test_echo_flags_rows_and_length_check() -> None:
    flags = echo_flags(
        ["What is the capital of France?", "Is Paris the capital of France?"],
        ["Paris is the capital.", "Yes, Paris is the capital of France."],
        ["The capital of France is Lyon"] * 2,
    )
    assert flags == [False, True]
    with pytest.raises(ValueError, match="echo_flags"):
        echo_flags(["a"], [], ["f"])


@pytest.mark.parametrize(
    ("question", "subject", "named"),
    [
        ("Where was Gilles Grimandi born?", "Gilles Grimandi", True),
        ("What did gilles-grimandi play?", "Gilles Grimandi", True),
        ("Who is Gilles Grimandi's coach?", "Gilles Grimandi", True),
        ("Who was born in France?", "Gilles Grimandi", False),
        ("Where was Grimandi born?", "Gilles Grimandi", False),
        ("Where was Gilles Grimandis born?", "Gilles Grimandi", False),
        ("Where is it?", "", False),
    ],
)
def test_names_subject(question: str, subject: str, named: bool) -> None:
    assert names_subject(question, subject) is named


@pytest.mark.parametrize(
    ("answer", "subject", "mentions"),
    [
        ("Sederat Alp died at the Red Sea.", "Sedat Alp", True),  # one word of two is enough
        ("Cuba is where Cuban espresso was created.", "Cuban espresso", True),
        ("Italy's official language is Italian.", "Italy", True),
        ("The answer to this question is 10.", "Cuban espresso", False),
        ("He performed on a musical instrument.", "Glen Ballard", False),
        ("Anything at all.", "The", True),  # no content word in the subject: no gate
    ],
)
def test_mentions_subject(answer: str, subject: str, mentions: bool) -> None:
    assert mentions_subject(answer, subject) is mentions
