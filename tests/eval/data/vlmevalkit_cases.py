"""Responses of the kinds models really give, for the answer-extraction table, each with the rule it exercises.

Plain data (no imports), read both by `tests/eval/test_eval_vlmevalkit_rules.py` and by
`make_vlmevalkit_golden.py`, which records what VLMEvalKit's own functions make of each response.
A case is (what the response is, the response, options, prompt asked for "Final answer:", the rule of
`ovis_batch.eval.answers.infer_choice` that decides it). Responses go through the whole reading chain:
the thinking trace split off, the text after "Final answer:" when asked for, then the rule.
"""

VEHICLES = {"A": "a red car", "B": "a blue bus", "C": "a dark red truck", "D": "a bicycle"}
COUNTS = {"A": "2", "B": "3", "C": "4", "D": "5"}
OPTIONS = {"vehicles": VEHICLES, "counts": COUNTS}

TRACE = (
    "<think>\nThe vehicle is large, so not A. Could it be B? The answer might be B or C... it has a "
    "cargo bed, so C.\n</think>\n\n"
)
FORCED = (
    "<think>\nLet me compare A and B. A seems wrong.\n\nConsidering the limited time by the user, I have to "
    "give the solution based on the thinking directly now.\n</think>\n\n"
)
LONG = (
    "The picture shows a street in the late afternoon with several parked vehicles along the curb, trees "
    "lining the sidewalk and a few pedestrians; the most prominent object in the foreground is a dark red "
    "truck with an open cargo bed."
)

# (what it is, response, options, final-answer prompt, deciding rule)
CHOICE_CASES = [
    ("letter only", "B", "vehicles", False, "letter"),
    ("letter with a period", "B.", "vehicles", False, "letter"),
    ("letter in parentheses", "(B)", "vehicles", False, "letter"),
    ("bold letter", "**B**", "vehicles", False, "letter"),
    ("letter and option text", "B) a blue bus", "vehicles", False, "letter"),
    ("'The answer is (B).'", "The answer is (B).", "vehicles", False, "letter"),
    ("'The answer is B'", "The answer is B", "vehicles", False, "letter"),
    ("'Answer: C'", "Answer: C", "vehicles", False, "letter"),
    ("'Option C'", "Option C", "vehicles", False, "letter"),
    ("letter after 'I would choose'", "I would choose D.", "vehicles", False, "letter"),
    ("letter after the pronoun I", "I believe it's B.", "vehicles", False, "letter"),
    ("markdown heading and bold letter", "### Answer\n**C**", "vehicles", False, "letter"),
    ("capital article read as option A", "A blue bus.", "vehicles", False, "letter"),
    (
        "explanation then 'answer is **C**'",
        (
            "The correct answer is **C**. Here's why: the vehicle has a cargo bed and is dark red, which "
            "matches a truck rather than a car or a bus."
        ),
        "vehicles",
        False,
        "answer is",
    ),
    (
        "reasoning with 'the answer is C' mid-sentence",
        ("I think the answer is C because the cargo bed is visible in the picture and it is red"),
        "vehicles",
        False,
        "answer is",
    ),
    ("lowercase 'the answer is b'", "the answer is b", "vehicles", False, "answer is"),
    (
        "two letters, then 'answer is C'",
        "Both A and C are vehicles, but the answer is C.",
        "vehicles",
        False,
        "answer is",
    ),
    ("option text only", "a blue bus", "vehicles", False, "option text"),
    ("option text in a sentence", "It is a bicycle.", "vehicles", False, "option text"),
    ("longer option text", "a dark red truck", "vehicles", False, "option text"),
    ("shorter option text", "a red car", "vehicles", False, "option text"),
    ("'C: text', letter too early among five words", "C: a dark red truck", "vehicles", False, "option text"),
    ("'(C) text', letter too early", "(C) a dark red truck", "vehicles", False, "option text"),
    ("number in a sentence: too long for short options", "There are 3 people.", "counts", False, "no match"),
    ("a bare number", "3", "counts", False, "option text"),
    ("lowercase letter alone", "b", "vehicles", False, "no match"),
    ("lowercase letter with a period", "c.", "vehicles", False, "no match"),
    ("lowercase letter in parentheses", "(c)", "vehicles", False, "no match"),
    ("lowercase after 'answer:'", "answer: c", "vehicles", False, "no match"),
    ("two letters", "B or C", "vehicles", False, "no match"),
    ("two letters joined", "A and B", "vehicles", False, "no match"),
    ("a letter that is no option", "The answer is E.", "vehicles", False, "no match"),
    (
        "letter at the start of a long sentence",
        ("C is the dark red truck visible on the left side of the road in the picture"),
        "vehicles",
        False,
        "no match",
    ),
    ("two number options in the text", "There are 3 people and 2 dogs.", "counts", False, "no match"),
    ("a long description (too long for option text)", LONG, "vehicles", False, "no match"),
    ("empty answer", "", "vehicles", False, "no match"),
    (
        "refusal: no image",
        "I'm sorry, but without the image provided I cannot answer.",
        "vehicles",
        False,
        "refusal",
    ),
    (
        "refusal: cannot determine",
        "Cannot determine the answer from the image.",
        "vehicles",
        False,
        "refusal",
    ),
    ("refusal: people", "Sorry, I can't help with images of people yet.", "vehicles", False, "refusal"),
    ("none of the options (Z)", "Z", "vehicles", False, "none of them"),
    ("'None of them: Z'", "None of the options is correct: Z", "vehicles", False, "none of them"),
    ("thinking trace, then the letter", TRACE + "C", "vehicles", False, "letter"),
    ("thinking trace, then 'The answer is C.'", TRACE + "The answer is C.", "vehicles", False, "letter"),
    ("forced end of thinking, then the letter", FORCED + "B", "vehicles", False, "letter"),
    (
        "thinking trace, Final answer with text",
        TRACE + "It has a cargo bed.\nFinal answer: C",
        "vehicles",
        True,
        "letter",
    ),
    (
        "reasoning, then 'Final answer: C'",
        ("The vehicle has a cargo bed, so it is a truck.\nFinal answer: C"),
        "vehicles",
        True,
        "letter",
    ),
    (
        "options discussed, then 'Final answer: C'",
        ("Looking at the options, A is a car and B is a bus. Final answer: C"),
        "vehicles",
        True,
        "letter",
    ),
    ("'Final answer: (D) a bicycle'", "Final answer: (D) a bicycle", "vehicles", True, "letter"),
    ("'Final Answer: **B**'", "Final Answer: **B**", "vehicles", True, "letter"),
    ("'The final answer is C.'", "The final answer is C.", "vehicles", True, "letter"),
    (
        "two 'Final answer:', the last counts",
        "Final answer: A\nWait, no.\nFinal answer: B",
        "vehicles",
        True,
        "letter",
    ),
    ("'final answer: option text'", "final answer: a bicycle", "vehicles", True, "option text"),
    ("Final answer asked, but not given", "It is the dark red truck: C", "vehicles", True, "letter"),
]

# (what it is, response, final-answer prompt)
YES_NO_CASES = [
    ("Yes", "Yes", False),
    ("No with a period", "No.", False),
    ("yes with an explanation", "Yes, there is a dog on the couch.", False),
    ("no with an explanation", "No, there is no dog in the picture.", False),
    ("'no' inside a sentence", "There is no dog in the image", False),
    ("'The answer is yes.'", "The answer is yes.", False),
    ("shouted YES!", "YES!", False),
    ("both words", "Yes and no.", False),
    ("yes, but 'no' later", "Yes, but there is no cat.", False),
    ("neither word", "I cannot tell from the image.", False),
    ("'not' is not 'no'", "Not sure, maybe not.", False),
    ("hyphenated no-one", "no-one is there", False),
    ("Final answer: No", "The sign reads STOP.\nFinal answer: No", True),
    ("Final answer after a trace", TRACE.replace("C.", "yes? no?") + "Final answer: Yes", True),
    ("'no' in the reasoning, 'Yes' after Final answer", "There is no doubt.\nFinal answer: Yes", True),
]
