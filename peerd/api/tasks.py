"""Symphony over HTTP: `POST /v1/tasks` runs a task, `GET /v1/tasks/{id}` shows it,
`POST /capabilities` changes the skills this peer advertises.

POST takes {"question", "workers" (default 3), "requirement" (default: the question),
"deadline_s" (each worker's, default 120), "answer_format" ("number" | "choice" |
"text", default "text")} and optionally "max_tokens" (per chain, default 256),
"bid_window_s" (default 2) and "memory" (true or {"k", "domain"}: the peer's memory's
best notes go before the question the workers get; the response lists them under
"memory"). A task with a verifiable answer also takes "reference" (the expected answer,
at most 500 characters; never sent to a worker), "scorer" (a name in
peerd/memory/scoring.py, default "number") and "domain" (the memory domain its run is
kept under; default memory.domain, else "general"): the settled answer is scored, the
run kept by the peer's memory as an SCEC, and the response adds "reference", "scorer",
"score" and "scec" (its hash; null when no memory kept it). It returns when the vote is
in:

    {"id", "answer", "votes": [{"peer_id", "answer", "confidence", "weight", "cot"}],
     "elected": [peer ids], "fallbacks": [{"seat", "peer_id", "reason", "replacement"}],
     "timings": {"beacon_ms", "solve_ms", "total_ms"}}

`answer` and each vote's `answer` are normalised (answers.py). GET returns the same
object: 200 once the task is over, 202 while it runs (votes so far). Progress streams
on /events as `task.*` events. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peerd.agents.record import TaskSpec
from peerd.agents.requester import NoWorkers
from peerd.api.errors import ApiError, json_object, read_json
from peerd.api.openai_request import notes_for, parse_memory
from peerd.api.recall import Note, Recall
from peerd.ledger.book import EntryTooLarge
from peerd.memory.prompting import with_notes
from peerd.memory.scoring import SCORERS
from peerd.rl.tasks import final_number
from protocols.beacon import ANSWER_FORMATS, MAX_BID_WINDOW_S, MAX_DEADLINE_S, MAX_WORKERS
from protocols.memory import DOMAIN
from protocols.task import MAX_QUESTION_CHARS, MAX_TASK_TOKENS

if TYPE_CHECKING:
    from peerd.agents.symphony import Symphony

MAX_BODY_BYTES = 256 * 1024
MAX_SKILLS_BODY_BYTES = 64 * 1024
MAX_SKILLS = 64
MAX_SKILL_CHARS = 200
MAX_SKILLS_BYTES = 8 * 1024  # all of them, UTF-8: they travel in our ledger entry
MAX_REFERENCE_CHARS = 500  # an expected answer: a number, a choice, a short text
FIELDS = {"question", "workers", "requirement", "deadline_s", "answer_format", "max_tokens",
          "bid_window_s", "memory", "reference", "scorer", "domain"}


def parse(body: Any) -> TaskSpec:
    """Validate a POST /v1/tasks body; ApiError(400) names the bad parameter."""
    body = json_object(body, FIELDS)
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ApiError(400, "'question' must be a non-empty string", param="question")
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(400, f"'question' is over {MAX_QUESTION_CHARS} characters",
                       param="question")
    workers = _int(body, "workers", 3, 1, MAX_WORKERS)
    requirement = body.get("requirement")
    if requirement is None:
        requirement = ""
    if not isinstance(requirement, str) or len(requirement) > 2000:
        raise ApiError(400, "'requirement' must be a string of at most 2000 characters",
                       param="requirement")
    answer_format = body.get("answer_format", "text")
    if answer_format not in ANSWER_FORMATS:
        raise ApiError(400, f"'answer_format' must be one of {', '.join(ANSWER_FORMATS)}",
                       param="answer_format")
    reference, scorer, domain = scoring(body)
    return TaskSpec(
        question=question, workers=workers, requirement=requirement.strip(),
        deadline_s=_number(body, "deadline_s", 120.0, MAX_DEADLINE_S),
        answer_format=answer_format,
        max_tokens=_int(body, "max_tokens", 256, 1, MAX_TASK_TOKENS),
        bid_window_s=_number(body, "bid_window_s", 2.0, MAX_BID_WINDOW_S),
        reference=reference, scorer=scorer, domain=domain,
    )


def scoring(body: dict[str, Any], default_domain: str = "general"
            ) -> tuple[str | None, str, str]:
    """A scored task's (or plan's) (reference, scorer, domain); the reference None for
    one without, which takes neither of the others. An unnamed domain is the one its
    notes come from, else `default_domain`."""
    reference, scorer, domain = body.get("reference"), body.get("scorer"), body.get("domain")
    if reference is None:
        for name, value in (("scorer", scorer), ("domain", domain)):
            if value is not None:
                raise ApiError(400, f"'{name}' is for a task with a 'reference' answer to "
                               "score against; give one, or drop it", param=name)
        return None, "number", default_domain
    if not isinstance(reference, str) or not reference.strip() \
            or len(reference) > MAX_REFERENCE_CHARS:
        raise ApiError(400, "'reference' (the expected answer) must be a non-blank string of "
                       f"at most {MAX_REFERENCE_CHARS} characters", param="reference")
    scorer = "number" if scorer is None else scorer
    if not isinstance(scorer, str) or scorer not in SCORERS:
        raise ApiError(400, f"'scorer' must be one of {', '.join(SCORERS)}", param="scorer")
    if scorer == "number" and final_number(reference) is None:
        raise ApiError(400, "'reference' holds no number for the 'number' scorer (it "
                       "compares final numbers): give one, or 'scorer': 'exact' or "
                       "'contains'", param="reference")
    if domain is not None and (not isinstance(domain, str) or not DOMAIN.fullmatch(domain)):
        raise ApiError(400, "'domain' must be a domain name (a-z 0-9 . _ -, at most 32)",
                       param="domain")
    if domain is None:  # unnamed: the domain its notes come from, else general
        ask = parse_memory(body.get("memory"))
        domain = ask.domain if ask is not None and ask.domain else default_domain
    return reference, scorer, domain


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be an integer in {lo}..{hi}", param=name)
    return v


def _number(body: dict[str, Any], name: str, default: float, hi: float) -> float:
    v = body.get(name, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= hi \
            or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a number of seconds in (0, {hi}]", param=name)
    return float(v)


async def with_memory(recall: Recall | None, body: Any, spec: TaskSpec
                      ) -> tuple[TaskSpec, list[Note] | None]:
    """The task with the memory's notes before its question (the workers see them; the
    skills are still matched against the question alone), and the notes."""
    ask = parse_memory(body.get("memory"))
    if ask is None:
        return spec, None
    notes = await notes_for(recall, ask, spec.question)
    question = with_notes(spec.question, [n.text for n in notes])
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(400, f"the question with its notes is over {MAX_QUESTION_CHARS} "
                       "characters: ask for fewer ('memory.k')", param="memory")
    return replace(spec, question=question, requirement=spec.effective_requirement,
                   prompt=spec.question, memory=tuple(n.text for n in notes),
                   memory_ids=tuple(n.id for n in notes)), notes


def routes(symphony: Symphony) -> list[Route]:
    async def create(request: Request) -> Response:
        try:
            body = await read_json(request, MAX_BODY_BYTES)
            spec, notes = await with_memory(symphony.recall, body, parse(body))
            record = await symphony.run_task(spec)
        except ApiError as exc:
            return exc.response()
        except NoWorkers as exc:
            return ApiError(503, str(exc), "service_unavailable", code="no_workers").response()
        out = record.to_json()
        if notes is not None:
            out["memory"] = [n.to_json() for n in notes]
        return JSONResponse(out)

    async def show(request: Request) -> Response:
        task = await symphony.task(request.path_params["task_id"])
        if task is None:
            return ApiError(404, "no such task on this peer: a peer keeps the tasks it "
                            "requested itself (the last 4096 finished)",
                            code="task_not_found").response()
        return JSONResponse(task, status_code=202 if task.get("status") == "running" else 200)

    async def capabilities(request: Request) -> Response:
        try:
            body = await read_json(request, MAX_SKILLS_BODY_BYTES)
            skills = json_object(body, {"skills"}).get("skills")
        except ApiError as exc:
            return exc.response()
        if (not isinstance(skills, list) or len(skills) > MAX_SKILLS
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_SKILL_CHARS
                           for s in skills)):
            return ApiError(400, f'"skills" must be a list of at most {MAX_SKILLS} non-empty '
                            f"strings of at most {MAX_SKILL_CHARS} characters",
                            param="skills").response()
        size = sum(len(s.encode()) for s in skills)
        if size > MAX_SKILLS_BYTES:
            return ApiError(400, f"the skills come to {size} bytes of UTF-8; at most "
                            f"{MAX_SKILLS_BYTES} travel in the ledger entry: send fewer "
                            "or shorter ones", param="skills").response()
        try:
            entry = symphony.set_skills(skills)
        except EntryTooLarge as exc:
            return ApiError(400, f"{exc} with these skills: send fewer or shorter ones "
                            "(the old skills stay)", param="skills").response()
        return JSONResponse({"peer_id": symphony.node.peer_id, "seq": entry.seq,
                             "skills": list(entry.skills)})

    return [
        Route("/v1/tasks", create, methods=["POST"]),
        Route("/v1/tasks/{task_id}", show),
        Route("/capabilities", capabilities, methods=["POST"]),
    ]
