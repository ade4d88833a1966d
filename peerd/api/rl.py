"""RL runs over HTTP: `POST /v1/rl/runs` starts one, `GET /v1/rl/runs[/{id}]` shows them.

POST takes a run's settings (peerd/rl/run.py, `RunSpec`: "model" is required, every
other field has a default) and answers 202 with the run as GET shows it, once the run
is accepted (its dir is writable; with "resume", a checkpoint is there). The run goes
on in the daemon; progress streams on /events as `rl.*` events. Errors use OpenAI's
error shape, naming the bad field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from peerd.api.errors import ApiError, read_json
from peerd.rl.run import RunSpec, SpecError

if TYPE_CHECKING:
    from peerd.rl.training import Training

MAX_BODY_BYTES = 64 * 1024


class RunRefused(Exception):
    """The run cannot start (a busy run id, an unwritable dir, nothing to resume)."""


def routes(training: Training) -> list[BaseRoute]:
    async def create(request: Request) -> Response:
        body = await read_json(request, MAX_BODY_BYTES)
        try:
            spec = RunSpec.parse(body)
        except SpecError as exc:
            raise ApiError(400, str(exc), param=exc.name) from None
        try:
            run = await training.start_run(spec)
        except RunRefused as exc:
            raise ApiError(409, str(exc)) from None
        return JSONResponse(run.to_json(), status_code=202)

    async def listing(request: Request) -> Response:
        return JSONResponse([r.to_json() for r in training.runs.values()])

    async def one(request: Request) -> Response:
        run = training.runs.get(request.path_params["run_id"])
        if run is None:
            raise ApiError(404, f"no run {request.path_params['run_id']!r} on this peer; "
                           "`peerd rl status` lists them", code="not_found")
        return JSONResponse(run.to_json())

    return [Route("/v1/rl/runs", create, methods=["POST"]),
            Route("/v1/rl/runs", listing, methods=["GET"]),
            Route("/v1/rl/runs/{run_id}", one, methods=["GET"])]
