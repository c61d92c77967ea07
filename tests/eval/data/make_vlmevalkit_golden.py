"""Regenerate vlmevalkit_golden.json: what VLMEvalKit's own functions make of each response in vlmevalkit_cases.py.

    git clone https://github.com/open-compass/VLMEvalKit /tmp/VLMEvalKit   # the golden: commit e8e78f05
    python tests/eval/data/make_vlmevalkit_golden.py --vlmevalkit /tmp/VLMEvalKit

VLMEvalKit is not installed (its dependencies are heavy) and none of its code is copied here: this script
reads the pure functions out of the checkout's source files with `ast` and runs them as they are:
`can_infer` (with `can_infer_option`, `can_infer_text`) from vlmeval/utils/matching_util.py,
`YOrN_Extraction` from vlmeval/dataset/utils/yorn.py (with `process_punctuation` from
vlmeval/smp/misc.py), and `_extract_final_answer`, nested in `Ovis2_5.generate_inner` of
vlmeval/vlm/ovis/ovis.py. The chain around them is the one `Ovis2_5` applies to a response: the text
after the first `</think>`, stripped; then, when the prompt carried the Final-answer instruction,
`_extract_final_answer`; then the benchmark's rule (exact matching, no LLM judge).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import logging
import os
import re
import string
import subprocess
from pathlib import Path

HERE = Path(__file__).parent


def load_functions(source: Path, names: list[str], assignments: tuple[str, ...] = ()) -> dict:
    """The named top-level functions (and module-level assignments) of `source`, executed on their own."""
    tree = ast.parse(source.read_text(), filename=str(source))
    wanted = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in assignments for t in node.targets))
    ]
    found = {node.name for node in wanted if isinstance(node, ast.FunctionDef)}
    missing = set(names) - found
    if missing:
        raise SystemExit(f"{source}: functions {sorted(missing)} not found; is this a VLMEvalKit checkout?")
    namespace = {"re": re, "cp": copy, "os": os, "string": string, "logger": logging.getLogger("vlmevalkit")}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(source), "exec"), namespace)
    return namespace


def load_ovis25_final_answer(source: Path) -> tuple:
    """`_extract_final_answer` from `Ovis2_5.generate_inner`, and the prompt suffix `Ovis2_5.__init__` sets."""
    tree = ast.parse(source.read_text(), filename=str(source))
    ovis = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Ovis2_5")
    methods = {n.name: n for n in ovis.body if isinstance(n, ast.FunctionDef)}
    nested = next(
        n
        for n in ast.walk(methods["generate_inner"])
        if isinstance(n, ast.FunctionDef) and n.name == "_extract_final_answer"
    )
    suffix = next(
        n.value.value
        for n in ast.walk(methods["__init__"])
        if isinstance(n, ast.Assign)
        and any(getattr(t, "attr", None) == "objective_prompt_suffix" for t in n.targets)
    )
    namespace: dict = {}
    exec(compile(ast.Module(body=[nested], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["_extract_final_answer"], suffix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlmevalkit", type=Path, required=True, help="a VLMEvalKit checkout")
    root = parser.parse_args().vlmevalkit
    matching = load_functions(
        root / "vlmeval/utils/matching_util.py",
        ["can_infer_option", "can_infer_text", "can_infer"],
        ("_VERBOSE_ANSWER_RE",),
    )
    punctuation = load_functions(root / "vlmeval/smp/misc.py", ["process_punctuation"])
    yorn = load_functions(root / "vlmeval/dataset/utils/yorn.py", ["YOrN_Extraction"])
    yorn["process_punctuation"] = punctuation["process_punctuation"]
    extract_final_answer, suffix = load_ovis25_final_answer(root / "vlmeval/vlm/ovis/ovis.py")

    import sys

    sys.path.insert(0, str(HERE))
    import vlmevalkit_cases as cases

    def response_of(raw: str, final: bool) -> str:
        # Ovis2_5.vllm_infer: the answer is what follows the first </think>, stripped
        text = raw.split("</think>", 1)[1] if "</think>" in raw else raw
        text = text.strip()
        return extract_final_answer(text) if final else text

    choice = []
    for what, response, options, final, _rule in cases.CHOICE_CASES:
        result = matching["can_infer"](response_of(response, final), dict(cases.OPTIONS[options]))
        choice.append({"case": what, "response": response, "vlmevalkit": result or None})
    yes_no = []
    for what, response, final in cases.YES_NO_CASES:
        yes_no.append(
            {
                "case": what,
                "response": response,
                "vlmevalkit": yorn["YOrN_Extraction"](response_of(response, final)),
            }
        )
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    document = {
        "made_by": "tests/eval/data/make_vlmevalkit_golden.py",
        "vlmevalkit_commit": commit,
        "ovis25_final_answer_instruction": suffix,
        "choice": choice,
        "yes_no": yes_no,
    }
    (HERE / "vlmevalkit_golden.json").write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {HERE / 'vlmevalkit_golden.json'}: {len(choice)} choice and {len(yes_no)} yes/no cases")


if __name__ == "__main__":
    main()
