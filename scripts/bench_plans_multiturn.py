"""scripts/bench_plans.py multiturn: BFCL's `multi_turn_base` answered by peerd's planner
(`POST /v1/plans`) on a 4-peer testnet whose tools are BFCL's executable classes, each
served by a peer, and scored by BFCL's own multi-turn checker.

The swarm: 4 real `peerd start` processes (testnet.up). peer0 serves SmolLM2 (the
embedded model, `--model smollm2`) and runs the plans; each peer starts
bfcl_mcp_server.py (`--mcp`) for its share of the 8 classes (PLACEMENT): peer0 holds
only the stateless MathAPI, the 7 stateful classes live on peers 1-3, so a case's calls
go over /peerd/tool/1.0.0 to other peers.

A case: reset each involved class on its peer (`CLASS.reset` with the case's
initial_config, through peer0's `POST /v1/tools/call`), then one plan per user turn
(goal: the turn's words after the earlier turns' (`goal_of`); tools: the involved
classes' methods; a budget per turn), waited for by polling `GET /v1/plans/{id}`. Each
plan step's calls that a peer executed (`ok`: the method ran; a refusal such as
invalid_arguments never reached the class) become that step's calls in BFCL's decoded
format, `name(arg=value, ...)`; the turns' steps go to bfcl_eval's multi_turn_checker
with the case's ground truth: the checker re-runs both on local instances of the classes
from the initial_config and compares, after every turn, the instances' state and that
every ground-truth result is among the model's results so far.

BFCL's checker keeps its instances in its module's globals, named after the model and
the case (`execute_multi_turn_func_call`); `score` gives each scoring a fresh name and
drops its instances after, so a case can be scored again.
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_plans_bfcl import bfcl_data

CLASSES = ("GorillaFileSystem", "MathAPI", "MessageAPI", "TwitterAPI", "TicketAPI",
           "TradingBot", "TravelAPI", "VehicleControlAPI")
# peer index -> the classes its MCP servers hold; peer 0 serves the model and plans
PLACEMENT: tuple[tuple[str, ...], ...] = (
    ("MathAPI",),
    ("GorillaFileSystem", "TwitterAPI", "TicketAPI"),
    ("TradingBot", "MessageAPI"),
    ("TravelAPI", "VehicleControlAPI"),
)
CATEGORY = "multi_turn_base"
MAX_GOAL_CHARS = 2000  # POST /v1/plans's limit
EXECUTED = "ok"  # a call whose method ran on its peer (its own error text included)


# ---- BFCL's data (pure) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Case:
    id: str
    turns: tuple[str, ...]  # each turn's user words
    initial_config: dict[str, Any]
    involved_classes: tuple[str, ...]
    ground_truth: tuple[tuple[str, ...], ...]  # each turn's calls, BFCL's strings

    def entry(self) -> dict[str, Any]:
        """The test entry as BFCL's checker reads it."""
        return {"id": self.id, "initial_config": self.initial_config,
                "involved_classes": list(self.involved_classes)}


def load_cases(n: int, seed: int) -> list[Case]:
    """`n` cases of multi_turn_base drawn with `seed` (all with n = 0), in file order."""
    name = f"BFCL_v4_{CATEGORY}.json"
    data = bfcl_data()
    entries = [json.loads(line) for line in (data / name).open() if line.strip()]
    answers = {a["id"]: a["ground_truth"] for a in
               (json.loads(line) for line in (data / "possible_answer" / name).open()
                if line.strip())}
    if 0 < n < len(entries):
        keep = set(random.Random(f"{seed}-{CATEGORY}").sample(range(len(entries)), n))
        entries = [e for i, e in enumerate(entries) if i in keep]
    return [Case(e["id"],
                 tuple("\n".join(m["content"] for m in turn if m["role"] == "user")
                       for turn in e["question"]),
                 e["initial_config"], tuple(e["involved_classes"]),
                 tuple(tuple(t) for t in answers[e["id"]])) for e in entries]


def class_docs(class_name: str) -> list[dict[str, Any]]:
    """BFCL's function docs of one class (data/multi_turn_func_doc), in file order."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = bfcl_data() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return [json.loads(line) for line in path.open() if line.strip()]


def new_instance(class_name: str, config: dict[str, Any] | None) -> Any:
    """A fresh instance, loaded as BFCL's executor loads it (not long-context)."""
    from bfcl_eval.constants.executable_backend_config import (
        CLASS_FILE_PATH_MAPPING,
        STATELESS_CLASSES,
    )

    cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
    instance = cls()
    if class_name not in STATELESS_CLASSES:
        instance._load_scenario(copy.deepcopy(config or {}), long_context=False)
    return instance


def class_tools(class_name: str) -> list[str]:
    """The tools a class's server offers for the planner: its documented methods."""
    return [doc["name"] for doc in class_docs(class_name)]


def reset_tool(class_name: str) -> str:
    return f"{class_name}.reset"


def case_tools(case: Case) -> list[str]:
    """The plan's tools: every method of the case's classes (never a reset)."""
    return [name for c in case.involved_classes for name in class_tools(c)]


def peer_of(class_name: str, placement: Sequence[Sequence[str]] = PLACEMENT) -> int:
    return next(i for i, held in enumerate(placement) if class_name in held)


def goal_of(case: Case, turn: int, limit: int = MAX_GOAL_CHARS) -> str:
    """The plan's goal for one turn: the turn's words, after the earlier turns' (the
    planner keeps nothing between plans; BFCL's model sees the whole conversation). The
    oldest earlier turns are dropped first to stay within `limit`."""
    now = f"Now do this: {case.turns[turn]}"
    earlier = list(case.turns[:turn])
    while True:
        head = ("Earlier requests in this session (done already):\n"
                + "\n".join(f"- {t}" for t in earlier) + "\n") if earlier else ""
        if len(head) + len(now) <= limit or not earlier:
            return (head + now)[:limit]
        earlier.pop(0)


# ---- plans -> BFCL's decoded calls (pure) --------------------------------------------------

def call_text(tool: str, arguments: dict[str, Any]) -> str:
    """A call as BFCL's decoded model output writes it: `name(a='x', b=1)`. The values
    come from JSON, so their Python repr is a literal BFCL's executor evaluates."""
    return f"{tool}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def executed_steps(record: dict[str, Any]) -> list[list[str]]:
    """A plan's steps as BFCL's decoded steps: the calls its peers executed, in order;
    steps with none are left out (as a text-only step is in BFCL)."""
    out = []
    for step in record.get("steps", []):
        calls = [call_text(c["tool"], c["arguments"]) for c in step.get("calls", [])
                 if c.get("code") == EXECUTED]
        if calls:
            out.append(calls)
    return out


def step_parses(record: dict[str, Any]) -> tuple[int, int]:
    """(steps that parsed, steps), from each step's `parsed` (a step whose calls a
    budget cut parsed too, though it has no calls)."""
    steps = record.get("steps", [])
    return sum(bool(s.get("parsed", True)) for s in steps), len(steps)


def ground_truth_calls(case: Case) -> list[list[tuple[str, dict[str, Any]]]]:
    """Each turn's ground-truth calls as the planner writes calls: a name and keyword
    arguments (BFCL's strings sometimes pass leading arguments by position: named here
    from the method's signature)."""
    import ast
    import inspect

    methods = {name: c for c in case.involved_classes for name in class_tools(c)}
    out = []
    for turn in case.ground_truth:
        calls = []
        for text in turn:
            node = ast.parse(text, mode="eval").body
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                raise ValueError(f"not a call: {text}")
            name = node.func.id
            params = list(inspect.signature(
                getattr(new_instance(methods[name], {}), name)).parameters)
            args = {params[k]: ast.literal_eval(a) for k, a in enumerate(node.args)}
            args |= {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
            calls.append((name, args))
        out.append(calls)
    return out


# ---- scoring with BFCL's checker -----------------------------------------------------------

def multi_turn_checker() -> Any:
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as checker

    return checker


def score(case: Case, turns: Sequence[Sequence[Sequence[str]]]) -> dict[str, Any]:
    """BFCL's verdict on the executed calls of each turn (a list of steps, each a list
    of call strings): {"valid": bool, "error_type"?, "error_message"?}."""
    checker = multi_turn_checker()
    utils = importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval."
                                    "multi_turn_utils")
    name = f"peerd_{uuid.uuid4().hex[:12]}"
    decoded = [[list(step) for step in turn] for turn in turns]
    decoded += [[] for _ in range(len(case.ground_truth) - len(decoded))]
    try:
        verdict = checker.multi_turn_checker(
            decoded, [list(t) for t in case.ground_truth], copy.deepcopy(case.entry()),
            CATEGORY, name)
    finally:
        for key in [k for k in vars(utils) if k.startswith(name)]:
            del vars(utils)[key]
    return {k: verdict[k] for k in ("valid", "error_type", "error_message") if k in verdict}


def replayed(case: Case, turns: Sequence[Sequence[Sequence[str]]]) -> list[str]:
    """The results BFCL's executor gives for the same calls on local instances (run in
    order, state carried across turns): what each peer's result should have been."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import (
        execute_multi_turn_func_call,
    )

    utils = importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval."
                                    "multi_turn_utils")
    name = f"peerd_{uuid.uuid4().hex[:12]}"
    out: list[str] = []
    try:
        for turn in turns:
            for step in turn:
                got, _ = execute_multi_turn_func_call(
                    list(step), copy.deepcopy(case.initial_config),
                    list(case.involved_classes), name, case.id)
                out += got
    finally:
        for key in [k for k in vars(utils) if k.startswith(name)]:
            del vars(utils)[key]
    return out


def peer_texts(records: Sequence[dict[str, Any]]) -> list[str | None]:
    """Each executed call's result text as its peer returned it (None where the
    observation was cut at its 500 characters), in the order `executed_steps` lists."""
    out: list[str | None] = []
    for record in records:
        for step in record.get("steps", []):
            for c in step.get("calls", []):
                if c.get("code") != EXECUTED:
                    continue
                try:
                    shown = json.loads(c.get("observation", ""))
                    out.append(str(shown["result"]["text"]))
                except (ValueError, KeyError, TypeError):
                    out.append(None)
    return out


def same_result(peer: str, local: str) -> bool:
    """A peer's result text against BFCL's local execution of the same call: equal as
    JSON values where both are JSON (a reset's config crosses the wire as canonical JSON,
    keys sorted, so a dict the class returns from it prints its keys in another order),
    else equal as text."""
    try:
        return bool(json.loads(peer) == json.loads(local))
    except ValueError:
        return peer == local


def server_command(python: str, class_name: str) -> str:
    """The `--mcp` command line of one class's server."""
    return f"{python} {Path(__file__).resolve().parent / 'bfcl_mcp_server.py'} {class_name}"


def plan_step_counts(metrics: str) -> dict[str, float]:
    """`peerd_plan_steps_total` from a /metrics page: "parse/constrained" -> steps."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if not line.startswith("peerd_plan_steps_total{"):
            continue
        labels, _, value = line.partition("} ")
        got = dict(part.split("=", 1) for part in labels.split("{", 1)[1].split(","))
        key = f"{got.get('parse', '?').strip(chr(34))}/{got.get('constrained', '?').strip(chr(34))}"
        out[key] = out.get(key, 0.0) + float(value)
    return out
