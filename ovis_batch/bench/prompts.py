"""The prompt of each benchmark question, per task type, the way Ovis2.5 is evaluated upstream.

VLMEvalKit's Ovis2.5 wrapper (`vlmeval/vlm/ovis/ovis.py`, `Ovis2_5`), which produced the published Ovis
numbers, builds:
- multiple choice: the hint (when there is one) on its own line, the question, one line per option
  "A. text", then the closing instruction "End your response with 'Final answer: '." (AI2D instead:
  "Answer with the option's letter from the given choices directly.");
- yes/no: the question (HallusionBench appends " Please answer yes or no."), then the same Final-answer
  instruction;
- short answer: the benchmark's own prompt in VLMEvalKit: the question, then "Answer the question using
  a single word or phrase."
The image comes before the text (the model runtime's chat template does that). When a prompt ends with
the Final-answer instruction, the answer scored is what follows "Final answer:"
(`ovis_batch.eval.answers.final_answer_tail`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ovis_batch.eval.answers import FINAL_ANSWER_INSTRUCTION

PROMPT_STYLE = "Ovis2.5 (as VLMEvalKit's Ovis2_5 wrapper builds its prompts)"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_REQUEST = " Please answer yes or no."


def default_instruction(task: str, name: str) -> str:
    """The closing instruction Ovis2.5 is evaluated with, for a benchmark of this task and name."""
    if task == "short_answer":
        return SHORT_ANSWER_INSTRUCTION
    if task == "mcq" and name.startswith("AI2D"):
        return LETTER_INSTRUCTION
    return FINAL_ANSWER_INSTRUCTION


def default_yes_no_request(name: str) -> bool:
    """Whether yes/no questions get " Please answer yes or no." (HallusionBench only, upstream)."""
    return "HallusionBench" in name


def build_prompt(
    question: str,
    instruction: str,
    *,
    hint: str | None = None,
    options: Mapping[str, str] | None = None,
    yes_no_request: bool = False,
) -> str:
    """One question's prompt: [hint] question [options] [yes/no request], then the instruction."""
    prompt = question
    if hint is not None:
        prompt = f"{hint}\n{prompt}"
    for letter, text in (options or {}).items():
        prompt += f"\n{letter}. {text}"
    if yes_no_request:
        prompt += YES_NO_REQUEST
    return f"{prompt}\n{instruction}"
