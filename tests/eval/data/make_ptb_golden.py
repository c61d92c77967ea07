"""Regenerate ptb_golden.json: captions and what the COCO toolkit's Java PTB tokenizer makes of them.

    python tests/eval/data/make_ptb_golden.py

Needs Java and the `pycocoevalcap` package (its stanford-corenlp-3.4.1.jar is the reference). Each
caption is tokenised on its own line followed by a neutral line, with `-preserveLines -lowerCase`, and
the COCO punctuation tokens are dropped (`ovis_batch.eval.ptb_tokenizer.java_ptb_tokenize`). The cases
are the hand-written ones below plus seeded random ones, so the file is reproducible.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))

from ovis_batch.eval.ptb_tokenizer import java_ptb_tokenize  # noqa: E402

HAND_WRITTEN = [
    "",
    "   ",
    "A man riding a wave on top of a surfboard.",
    "a man riding a wave on top of a surfboard",
    "A MAN RIDING A WAVE ON TOP OF A SURFBOARD!",
    "Two dogs play in the snow , near a red fence .",
    "A dog (brown) sits [on] the {couch}.",
    "\"Hello,\" she said. 'Yes' it's don't can't won't I'm we'll they've",
    "Black-and-white photo of a café in São Paulo — naïve façade… ok",
    "Two cats; one dog: three birds! Really? Yes...",
    "The colour of the neighbour's car is grey.",
    "Cost is $5.50 & 3/4 of 10% at 3:30pm, e.g. U.S.A. etc.",
    "a/b c*d e+f <tag> http://example.com foo@bar.com",
    "--dashes -- and - single-dash and 'quoted' and `back`",
    "He said \"yes\" and 'no' and ''double single''.",
    "Don't DON'T Can't cannot gonna wanna gotta lemme",
    "The dog's bone, the dogs' bones, James' car, it's its",
    "I'd you'd he's she'll we're they're y'all o'clock rock'n'roll",
    "Mr. Smith and Dr. Jones met Prof. X at St. Paul's, etc. and so on.",
    "The U.S. flag. A U.S. flag. U.K. is near.",
    "A 3-year-old boy, 2nd place, 1990s, '90s, 100m, 5km, 12:30, 3.14, 1,000,000 people",
    "A 10-20 range, -5 degrees, +3 points, 1/2 cup, ½ cup, 5 7/8 inches",
    "$100, €50, £20, ¥1000, 50¢, 100$ and #hashtag @user me@x.org www.google.com",
    "An email: John.Smith@example.co.uk and url https://a.b/c?d=e&f=g.",
    "C++ and C# and A&T and AT&T and R&D and S&P 500",
    "Bullet • point · mid ∙ dot ★ star ♥ heart ™ © ® ° 30°C × ÷",
    "emoji 😀 🐶 and CJK 中文字 and Arabic العربية and Hindi हिन्दी and Cyrillic Привет",
    "Curly ‘single’ and “double” quotes and „low“ and «guillemets» ‹single›",
    "Dashes – en — em ― bar ‐ hyphen ‑ nbhyphen - minus − math",
    "Ellipsis … and .... and . . . and ..",
    "What?! Really?? No!!! Yes!?",
    "A wave;a dog:a cat,a bird.a fish",
    "Word.Word word..word word...word",
    "tabs\tbetween\twords and\u00a0nbsp here",
    "a_b c__d ___ ** * *** ^ ~ | \\ = < > <b>bold</b> <br/> 3<4 a>b",
    "(a) [b] {c} ((double)) -LRB- -lrb-",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND I.B.M.",
    "Straße ÉCOLE İstanbul ΣΟΦΙΑ ΟΔΟΣ Ǆ ﬁ ligature Å",
    "x² H₂O 3⁄4 ¼ ⅓ ⅔",
    "The A.M. and p.m. and a.m. times",
    "it's 5 o'clock. 'Tis the season. 'em 'cause 'til",
    "shouldn't've wouldn't couldn't didn't isn't aren't wasn't weren't hasn't haven't hadn't won't",
    "l'amour d'accord j'ai",
    "The  black-and-white  self-driving car's e-mail re-enter co-op",
    "Vs. vs. v. Inc. Co. Corp. Ltd. Jr. Sr. No. 5",
    "Jan. 5, Sept. 2020, Mon. morning",
    "&amp; &lt; &gt; &quot; &apos; &nbsp; &#39; &mdash;",
    "zero-width\u200bspace soft\u00adhyphen",
    "line\nbreak and carriage\rreturn and\u2028separator",
    "A smiley :) and ;-) and :D and ^_^ and (^_^)",
    "The file photo.jpg and report.pdf, and notes.txt.",
    "Call (555) 123-4567 or 555-123-4567 today",
    "12/25/2020 and 1-2-2020 and 10/20",
    "A man in a t-shirt and a woman in a T-Shirt.",
    "There are 2 people, one of them is holding an umbrella.",
    "a picture of a living room with a couch , tv and a lamp",
    "An older woman with glasses is looking at her phone.",
    "Pizza with pepperoni, mushrooms & olives on a wooden table.",
    "A STOP sign at the corner of 5th Ave. and Main St.",
    "A giraffe standing next to a tree in a zoo enclosure..",
    "Close-up of a cat's face; its eyes are green!",
    "A train (engine no. 4501) pulls into the station.",
]


def token_fuzz(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pool = [case for line in HAND_WRITTEN for case in line.split()] + ["Mr.", "U.S.", "A.", "etc.", "'90"]
    seps = [" "] * 12 + ["", "  ", "\t", "\u00a0", "\u200b", "\u3000"]
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 14)):
            parts += [rng.choice(pool), rng.choice(seps)]
        lines.append("".join(parts))
    return lines


def char_fuzz(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    chars = string.ascii_letters * 3 + string.digits * 2 + string.punctuation * 2 + "      "
    chars += "éüñßİΣσ中あ😀\u00a0\u2019\u201c\u201d\u2013\u2014\u2026\u00ad\u200b½²€£¢°•"
    return ["".join(rng.choice(chars) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def unicode_fuzz(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.3:
                chars.append(chr(rng.randint(0x20, 0x7E)))
            elif r < 0.4:
                chars.append(" ")
            elif r < 0.9:
                code = rng.choice([c for c in range(0xA0, 0xFFFE) if not 0xD800 <= c <= 0xDFFF][::97])
                chars.append(chr(code))
            else:
                chars.append(chr(rng.randint(0x10000, 0x1FAFF)))
        lines.append("".join(chars))
    return lines


def cases() -> list[str]:
    return HAND_WRITTEN + token_fuzz(1, 200) + char_fuzz(2, 200) + unicode_fuzz(3, 100)


def main() -> None:
    captions = cases()
    tokenized = java_ptb_tokenize(captions)
    out = {
        "made_by": "tests/eval/data/make_ptb_golden.py",
        "reference": "stanford-corenlp-3.4.1.jar (pycocoevalcap 1.2), PTBTokenizer -preserveLines -lowerCase, "
        "COCO punctuation removed",
        "cases": [{"caption": c, "ptb": t} for c, t in zip(captions, tokenized, strict=True)],
    }
    (HERE / "ptb_golden.json").write_text(
        json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(captions)} cases to {HERE / 'ptb_golden.json'}")


if __name__ == "__main__":
    main()
