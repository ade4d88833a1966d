"""scripts/bench_plans.py bfcl: the Berkeley Function Calling Leaderboard's single-turn
Python categories (`simple`, `multiple`, `parallel`, `parallel_multiple`, from the
`bfcl-eval` package's own data, installed --no-deps), answered by the embedded
SmolLM2-135M-Instruct and scored by BFCL's own AST checker. This is not GAIA (GAIA
needs the web); it is BFCL's offline AST part.

The model: one peerd peer in-process (bench_memory_peer.py: a node, its ledger's gossip
and a ModelSlot, as `peerd start --model smollm2` loads it), asked through the slot's
typed face (prepare_chat, then complete: peerd's own generation loop), greedy, plain
decoding (no draft), at most --max-tokens tokens.

The prompt: BFCL's own system prompt for prompting models (default_prompts: the
"classic" style, plaintext, the function docs as JSON with BFCL's Python hint) with its
JSON return format, `[{"function": NAME, "parameters": {...}}, ...]`, then the
question's user turn. The output is parsed by `parse_calls` into BFCL's model-output
format, `[{NAME: {PARAM: VALUE}}]`, and scored by
bfcl_eval.eval_checker.ast_eval.ast_checker (the category's checker: one call, one of
several functions, parallel calls in any order).

The arms:
- unconstrained: the text as the model writes it. Parse rate: outputs `parse_calls`
  turns into a call list; accuracy: outputs the checker accepts (unparsed count wrong).
- constrained: decoding under the grammar of `call_list_schema` (a JSON array of 1..8
  calls, each naming one of the question's functions with parameters that satisfy its
  converted schema: `bfcl_schema`), peerd/plans/grammar.py's JsonGrammar with
  constrain.py's GrammarConstraint. Where the branch has no grammar, the arm reports
  "constrained decoding not available on this branch" and is skipped.

BFCL's checker reads one flag from its model config (underscore_to_dot: names keep their
dots here); that config module imports every vendor SDK, which --no-deps leaves out, so
`ast_checker` stands a small config in its place before importing the checker.
"""

from __future__ import annotations

import copy
import inspect
import json
import random
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel",
              "parallel_multiple": "parallel_multiple"}
MODEL_NAME = "peerd-smollm2"  # BFCL's checker looks it up (no underscore: it maps "_" to "/")
MAX_CALLS = 8  # calls in one answer (the planner's step takes 1..8 as well)
NOT_AVAILABLE = "constrained decoding not available on this branch"

# BFCL's parameter types -> JSON Schema's. "float" accepts integers (BFCL's checker turns
# an int into a float for a float parameter); "any" is a string, as BFCL's own OpenAPI
# mapping and its checker (PYTHON_TYPE_MAPPING: any -> str) both have it.
SCALARS = {"string": "string", "integer": "integer", "float": "number", "number": "number",
           "boolean": "boolean", "bool": "boolean", "any": "string"}
ARRAYS = {"array", "tuple", "list"}
OBJECTS = {"dict", "object"}
KEPT = ("description", "enum", "minimum", "maximum")  # dropped: default, optional, format


class BadDoc(ValueError):
    """A function doc this converter cannot turn into JSON Schema."""


# ---- function docs -> JSON Schema (pure) ----------------------------------------------

def bfcl_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one BFCL parameter doc (or a function's `parameters`)."""
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise BadDoc(f"a parameter without a type: {json.dumps(doc)[:120]}")
    out: dict[str, Any] = {k: doc[k] for k in KEPT if k in doc}
    if kind in SCALARS:
        out["type"] = SCALARS[kind]
    elif kind in ARRAYS:
        out["type"] = "array"
        if isinstance(doc.get("items"), dict):
            out["items"] = bfcl_schema(doc["items"])
    elif kind in OBJECTS:
        out["type"] = "object"
        properties = doc.get("properties")
        if isinstance(properties, dict):
            out["properties"] = {name: bfcl_schema(p) for name, p in properties.items()}
            # a required name with no property (BFCL has a few) cannot be written under
            # additionalProperties false: it is dropped rather than make the schema empty
            out["required"] = [r for r in doc.get("required", []) if r in properties]
            out["additionalProperties"] = False
        # no properties: any JSON object (BFCL: "a dictionary where keys are ...")
    else:
        raise BadDoc(f"unknown BFCL type {kind!r}")
    return out


def call_list_schema(functions: Sequence[dict[str, Any]], max_calls: int = MAX_CALLS
                     ) -> dict[str, Any]:
    """A JSON array of 1..max_calls calls in BFCL's JSON return format, each naming one
    of `functions` with parameters valid for it."""
    calls = [{"type": "object",
              "properties": {"function": {"type": "string", "enum": [f["name"]]},
                             "parameters": bfcl_schema(f["parameters"])},
              "required": ["function", "parameters"], "additionalProperties": False}
             for f in functions]
    return {"type": "array", "minItems": 1, "maxItems": max_calls,
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


# ---- the model's text -> BFCL's model-output format (pure) ------------------------------

NAME_KEYS = ("function", "name")  # BFCL's JSON format says "function"; chat-tuned models
ARGS_KEYS = ("parameters", "arguments")  # often write OpenAI's "name"/"arguments"


def parse_calls(text: str) -> list[dict[str, dict[str, Any]]] | None:
    """The calls in `text` as BFCL's checker takes them, `[{name: {param: value}}]`, or
    None when it holds no call list. Read: the first JSON array or object in the text
    (a ```json fence and any text around it are skipped), an object being one call; each
    call an object with a name ("function" or "name") and an object of arguments
    ("parameters" or "arguments"). Python call syntax is not read: the prompt asks for
    JSON."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char not in "[{":
            continue
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        calls = _calls_of(value)
        if calls is not None:
            return calls
    return None


def _calls_of(value: Any) -> list[dict[str, dict[str, Any]]] | None:
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    out = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = next((item[k] for k in NAME_KEYS if k in item), None)
        args = next((item[k] for k in ARGS_KEYS if k in item), None)
        if not isinstance(name, str) or not isinstance(args, dict):
            return None
        out.append({name: args})
    return out


# ---- BFCL's data, prompt and checker ------------------------------------------------------

def bfcl_data() -> Path:
    import bfcl_eval

    return Path(bfcl_eval.__file__).parent / "data"


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    category: str
    messages: tuple[dict[str, str], ...]  # the first turn's messages
    functions: tuple[dict[str, Any], ...]  # BFCL's docs, as the checker reads them
    answer: tuple[dict[str, Any], ...]  # BFCL's ground truth


def load_questions(category: str, n: int, seed: int) -> list[Question]:
    """`n` questions of `category` drawn with `seed` (all with n = 0), in file order."""
    name = f"BFCL_v4_{CATEGORIES[category]}.json"
    data = bfcl_data()
    entries = [json.loads(line) for line in (data / name).open()]
    answers = {a["id"]: a["ground_truth"] for a in
               (json.loads(line) for line in (data / "possible_answer" / name).open())}
    if 0 < n < len(entries):
        keep = set(random.Random(f"{seed}-{category}").sample(range(len(entries)), n))
        entries = [e for i, e in enumerate(entries) if i in keep]
    return [Question(e["id"], category, tuple(e["question"][0]), tuple(e["function"]),
                     tuple(answers[e["id"]])) for e in entries]


def system_prompt(question: Question) -> str:
    """BFCL's default system prompt for prompting models, with its JSON return format:
    formulate_system_prompt("ret_fmt=json&tool_call_tag=False&func_doc_fmt=json&
    prompt_fmt=plaintext&style=classic"), built from its templates (its model_handler
    package imports tree_sitter, which --no-deps leaves out)."""
    from bfcl_eval.constants import default_prompts as bp
    from bfcl_eval.utils import add_language_specific_hint_to_function_doc

    hinted = add_language_specific_hint_to_function_doc(
        [{"id": question.id, "function": copy.deepcopy(list(question.functions))}])
    style = bp.PROMPT_STYLE_TEMPLATES["classic"]
    return str(bp.PROMPT_TEMPLATE_MAPPING["plaintext"].format(
        persona=style["persona"], task=style["task"],
        tool_call_format=style["tool_call_no_tag"].format(
            output_format=bp.OUTPUT_FORMAT_MAPPING["json"],
            param_types=bp.PARAM_TYPE_MAPPING["json"]),
        multiturn_behavior=style["multiturn_behavior"],
        available_tools=style["available_tools"].format(
            format="json", functions=json.dumps(hinted[0]["function"], indent=4))))


def ast_checker() -> Callable[..., dict[str, Any]]:
    """BFCL's ast_checker, its model config stood in by one entry (see the docstring)."""
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        config = types.ModuleType(name)
        config.MODEL_CONFIG_MAPPING = {  # type: ignore[attr-defined]
            MODEL_NAME: types.SimpleNamespace(underscore_to_dot=False)}
        sys.modules[name] = config
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker as checker

    return checker  # type: ignore[no-any-return]


def check(question: Question, calls: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """BFCL's verdict on `calls`: {"valid": bool, "error_type": ...}."""
    from bfcl_eval.constants.enums import Language

    return ast_checker()(list(question.functions), calls, list(question.answer),
                         Language.PYTHON, question.category, MODEL_NAME)


# ---- answering -------------------------------------------------------------------------

@dataclass
class Arm:
    """One arm's answers in one category."""

    arm: str
    category: str
    parsed: list[bool] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)  # forward passes (the prompt's too)
    texts: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        from peerd.rl.evaluate import wilson

        n = len(self.correct)
        right = sum(self.correct)
        lo, hi = wilson(right, n)
        return {"arm": self.arm, "category": self.category, "n": n,
                "parse_rate": sum(self.parsed) / max(n, 1), "parsed": sum(self.parsed),
                "accuracy": right / max(n, 1), "correct": right, "ci95": [lo, hi],
                "mean_tokens": sum(self.tokens) / max(n, 1),
                "mean_prompt_tokens": sum(self.prompt_tokens) / max(n, 1),
                "seconds_per_question": sum(self.seconds) / max(n, 1),
                "mean_passes": sum(self.passes) / max(n, 1),
                "tokens_per_pass": sum(self.tokens) / max(sum(self.passes), 1),
                "errors": dict(self.errors.most_common()), "examples": self.examples[:3]}


def constraint_support(face: Any) -> Callable[[Question], Any] | str:
    """A maker of each question's constraint, or why there is none."""
    try:
        from peerd.plans.constrain import GrammarConstraint, Vocab
        from peerd.plans.grammar import JsonGrammar
    except ImportError:
        return NOT_AVAILABLE
    if "constraint" not in inspect.signature(face.complete).parameters:
        return NOT_AVAILABLE + " (the face's complete takes no constraint)"
    vocab = Vocab.from_tokenizer(face.tokenizer)

    def make(question: Question) -> Any:
        return GrammarConstraint(JsonGrammar.for_schema(call_list_schema(question.functions)),
                                 vocab)

    return make


async def answer_all(face: Any, questions: Sequence[Question], arm: str, max_tokens: int,
                     constraint_of: Callable[[Question], Any] | None = None,
                     progress: Callable[[str], None] = print) -> Arm:
    """Each question answered greedily and scored; `constraint_of` gives the
    constrained arm its grammar."""
    from peerd.inference.face import Refused
    from peerd.inference.options import SamplingParams, SpeculativeOptions

    out = Arm(arm, questions[0].category if questions else "")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for k, q in enumerate(questions):
        messages = [{"role": "system", "content": system_prompt(q)}, *q.messages]
        began = time.perf_counter()
        try:
            request = await face.prepare_chat(messages, params, SpeculativeOptions())
        except Refused as exc:  # the prompt does not fit the context
            out.errors[f"refused:{exc.param}"] += 1
            for column in (out.parsed, out.correct):
                column.append(False)
            out.tokens.append(0)
            out.prompt_tokens.append(0)
            out.passes.append(0)
            out.texts.append("")
            out.seconds.append(time.perf_counter() - began)
            continue
        if constraint_of is None:
            done = await face.complete(request)
        else:
            done = await face.complete(request, constraint=constraint_of(q))
        out.seconds.append(time.perf_counter() - began)
        out.tokens.append(done.stats.completion_tokens)
        out.prompt_tokens.append(done.stats.prompt_tokens)
        out.passes.append(done.stats.steps)
        out.texts.append(done.text)
        calls = parse_calls(done.text)
        out.parsed.append(calls is not None)
        verdict = check(q, calls) if calls is not None else {
            "valid": False, "error_type": "unparsed"}
        out.correct.append(bool(verdict["valid"]))
        if not verdict["valid"]:
            out.errors[str(verdict.get("error_type", "?"))] += 1
            if len(out.examples) < 3:
                out.examples.append({"id": q.id, "output": done.text[:300],
                                     "error": str(verdict.get("error", ""))[:200]})
        progress(f"{arm} {q.category} {k + 1}/{len(questions)}: "
                 f"{'ok' if verdict['valid'] else verdict.get('error_type')}")
    return out
