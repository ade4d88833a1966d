"""RL runs over HTTP: `POST /v1/rl/runs` starts one, `GET /v1/rl/runs[/{id}]` shows them.

`POST /v1/rl/runs/{id}/stop` stops a run after the step in hand, with a checkpoint
(`--resume` continues it).

POST takes a run's settings (peerd/rl/run.py, `RunSpec`: "model" is required, every
other field has a default) and answers 202 with the run as GET shows it, once the run
is accepted. The run goes on in the daemon; progress streams on /events as `rl.*`
events. Errors use OpenAI's error shape, naming the bad field ("body" for a body that
is not a JSON object of settings):

- 400: not JSON, nested too deep, an unknown setting, a wrong type, out of range, a
  model SPEC that does not resolve here, a task that does not load (checked now, so a
  bad one is never a run that fails later);
- 413: a body over MAX_BODY_BYTES;
- 409: the run cannot start here now (another run going on, an unwritable dir, nothing
  to resume, a dir that already holds a run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from peerd.api.errors import ApiError, answering, read_json
from peerd.rl.run import RunSpec, SpecError

if TYPE_CHECKING:
    from peerd.rl.training import Run, Training

MAX_BODY_BYTES = 64 * 1024
# No setting needs more; a larger int (JSON allows any) cannot become a float, and
# the range checks compare as floats.
MAX_ABS_INT = 2**63


class RunRefused(Exception):
    """The run cannot start (a busy run id, an unwritable dir, nothing to resume);
    `param` names the setting to change, when one would do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def routes(training: Training) -> list[BaseRoute]:
    async def create(request: Request) -> Response:
        try:
            body = await read_json(request, MAX_BODY_BYTES)
        except ApiError as exc:
            exc.param = exc.param or "body"
            raise
        spec = await parse_spec(body)
        try:
            run = await training.start_run(spec)
        except RunRefused as exc:
            raise ApiError(409, str(exc), param=exc.param, code="run_refused") from None
        return JSONResponse(run.to_json(), status_code=202)

    async def listing(request: Request) -> Response:
        return JSONResponse([r.to_json() for r in training.runs.values()])

    def find(request: Request) -> Run:
        run = training.runs.get(request.path_params["run_id"])
        if run is None:
            raise ApiError(404, f"no run {request.path_params['run_id']!r} on this peer; "
                           "`peerd rl status` lists them", code="not_found")
        return run

    async def one(request: Request) -> Response:
        return JSONResponse(find(request).to_json())

    async def stop(request: Request) -> Response:
        run = find(request)
        run.stop()
        return JSONResponse(run.to_json(), status_code=202)

    return [Route("/v1/rl/runs", answering(create), methods=["POST"]),
            Route("/v1/rl/runs", answering(listing), methods=["GET"]),
            Route("/v1/rl/runs/{run_id}", answering(one), methods=["GET"]),
            Route("/v1/rl/runs/{run_id}/stop", answering(stop), methods=["POST"])]


async def parse_spec(body: Any) -> RunSpec:
    """The run a body asks for, its model and task found here; ApiError(400) naming
    the field otherwise."""
    if isinstance(body, dict):
        for name, value in body.items():
            if isinstance(value, int) and not isinstance(value, bool) and \
                    abs(value) >= MAX_ABS_INT:
                raise ApiError(400, f"{name}: {value} is out of range", param=name)
    try:
        spec = RunSpec.parse(body)
    except SpecError as exc:
        raise ApiError(400, str(exc), param=exc.name) from None
    why = await trio.to_thread.run_sync(_model_error, spec.model)
    if why:
        raise ApiError(400, f"model: {why}", param="model", code="model_not_found")
    why = await trio.to_thread.run_sync(_task_error, spec.task, spec.seed)
    if why:
        raise ApiError(400, f"task: {why}", param="task", code="task_not_found")
    return spec


def _model_error(model: str) -> str:
    """Why the SPEC does not resolve on this peer ("" when it does). Offline: the
    trainer loads its own copy of the policy from it."""
    from peerd.inference.model.source import ModelError, resolve

    try:
        resolve(model)
    except (ModelError, OSError, ValueError) as exc:
        return str(exc)
    return ""


def _task_error(task: str, seed: int) -> str:
    """Why the task does not load ("" when it does): an unknown name, a missing or
    malformed file."""
    from peerd.rl.tasks import load_task

    try:
        load_task(task, seed=seed)
    except (ValueError, OSError) as exc:
        return str(exc)
    return ""
