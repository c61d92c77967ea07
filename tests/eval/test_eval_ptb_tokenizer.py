"""The pure-Python PTB tokenizer against the Stanford jar the COCO toolkit runs.

Always: against the recorded jar output in data/ptb_golden.json (hand-written captions covering
punctuation, casing, quotes, brackets, numbers, abbreviations, unicode and emoji, plus seeded random
text). With Java: against the jar itself, on the recorded cases and on fresh random text, and on every
character of the Basic Multilingual Plane (marked slow).
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

import pytest

from ovis_batch.eval import ptb_tokenizer as ptb

GOLDEN = json.loads((Path(__file__).parent / "data" / "ptb_golden.json").read_text(encoding="utf-8"))
JAVA_MISSING = ptb.java_available()
needs_java = pytest.mark.skipif(
    JAVA_MISSING is not None, reason=f"Java tokenizer unavailable: {JAVA_MISSING}"
)


def test_matches_recorded_jar_output():
    mismatches = [
        (case["caption"], case["ptb"], ptb.ptb_tokenize(case["caption"]))
        for case in GOLDEN["cases"]
        if ptb.ptb_tokenize(case["caption"]) != case["ptb"]
    ]
    assert len(GOLDEN["cases"]) > 500
    assert mismatches == []


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ("", ""),
        ("Don't stop; it's 3:30pm!", "do n't stop it 's 3:30 pm"),
        (
            "A dog (brown) sits [on] the {couch}.",
            "a dog -lrb- brown -rrb- sits -lsb- on -rsb- the -lcb- couch -rcb-",
        ),
        ('"Quoted" words — and… dashes', "quoted words and dashes"),
        ("Café in SÃO PAULO 😀 near the U.S. border", "café in são paulo near the u.s. border"),
        ("Costs $5.50, ½ cup, 5 7/8 in.", "costs $ 5.50 1/2 cup 5\u00a07/8 in"),
        ("line\nbreak\rand\u2028more", "line break and more"),
    ],
)
def test_known_outputs(caption, expected):
    assert ptb.ptb_tokenize(caption) == expected


def test_many_tokenizes_each_caption_like_one():
    captions = ["A cat.", "A cat.", "Two DOGS!", ""]
    assert ptb.ptb_tokenize_many(captions) == [ptb.ptb_tokenize(c) for c in captions]


def test_rule_start_filters_never_hide_a_match():
    """Every rule whose pattern matches at a position is among the rules tried for that character."""
    text = " ".join(case["caption"] for case in GOLDEN["cases"][:80]) + "\nx"
    for pos in range(len(text)):
        tried = ptb._rules_starting_with(text[pos])
        for rule in ptb._rules():
            if rule not in tried and any(p.match(text, pos) for p in rule.patterns):
                raise AssertionError(
                    f"rule {rule.name} matches at {text[pos : pos + 20]!r} but is filtered out"
                )


def lex_without_fast_paths(caption: str) -> list[str]:
    text = ptb._LINE_BREAKS.sub(" ", caption) + "\nx"
    tokens, pos = [], 0
    while pos < len(text) - 2:
        token, consumed = ptb._lex_at(text, pos)
        tokens += [token] if token is not None else []
        pos += consumed
    return tokens


def test_fast_paths_agree_with_the_rules():
    captions = [case["caption"] for case in GOLDEN["cases"]] + random_lines(seed=99, n=400)
    captions += [
        "Mr. Smith.",
        "etc. and so.",
        "a. b. c.",
        "plan B. The end.",
        "op. 5",
        "Co. Ltd",
        "x.",
        "no. 3 no.",
    ]
    assert [ptb._lex_line(c) for c in captions] == [lex_without_fast_paths(c) for c in captions]


def random_lines(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters * 3 + string.digits * 2 + string.punctuation * 2 + " " * 8
    alphabet += "éüñßİΣσ中あ😀\u00a0\u2019\u201c\u201d\u2013\u2014\u2026\u00ad\u200b½²€£¢°•"
    words = [w for case in GOLDEN["cases"][:60] for w in case["caption"].split()]
    lines = []
    for i in range(n):
        if i % 2:
            lines.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))))
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))))
    return lines


@needs_java
def test_matches_the_jar_on_recorded_cases():
    captions = [case["caption"] for case in GOLDEN["cases"]]
    assert ptb.java_ptb_tokenize(captions) == [case["ptb"] for case in GOLDEN["cases"]]


@needs_java
def test_matches_the_jar_on_fresh_random_text():
    lines = random_lines(seed=20260, n=1500)
    java = ptb.java_ptb_tokenize(lines)
    python = ptb.ptb_tokenize_many(lines)
    mismatches = [(line, j, p) for line, j, p in zip(lines, java, python, strict=True) if j != p]
    assert mismatches == []


@needs_java
@pytest.mark.slow
def test_matches_the_jar_on_every_bmp_character():
    skip = {0x0A, 0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029}
    codes = [c for c in range(0x20, 0x10000) if not 0xD800 <= c <= 0xDFFF and c not in skip]
    lines = [f"q{chr(c)}q {chr(c)} Q{chr(c)}7" for c in codes]
    java = ptb.java_ptb_tokenize(lines)
    python = ptb.ptb_tokenize_many(lines)
    assert [hex(c) for c, j, p in zip(codes, java, python, strict=True) if j != p] == []


def test_java_reports_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(ptb.shutil, "which", lambda name: None)
    assert ptb.java_available() == "no `java` on PATH"
    with pytest.raises(RuntimeError, match="no `java` on PATH"):
        ptb.java_ptb_tokenize(["a caption"])


def test_punctuation_list_is_the_toolkits():
    toolkit = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    assert set(toolkit.PUNCTUATIONS) == ptb.COCO_PUNCTUATION
    assert not any(re.search(r"[a-z]", p) for p in ptb.COCO_PUNCTUATION)  # upper-case brackets only
