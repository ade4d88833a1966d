"""Shared fixtures. The in-process network harness lives in tests/harness.py."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test modules import helpers as `tests.harness`; that needs the repository root on
# sys.path under plain `pytest` too, not only under `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# Converted model metadata (gguf_cache) is kept inside the checkout (.cache/, ignored by
# git), not in the user's cache: the suite reads nothing from outside the repository.
# Set here for fixtures of any scope and the peer processes they start; tests keep it.
_CACHE = str(Path(_ROOT) / ".cache")
os.environ["PEERD_CACHE_DIR"] = _CACHE
# Under pytest-xdist the workers share the cores: torch's default of a thread per core
# in every worker (and in every peer process a test starts) oversubscribes them, and
# OpenMP threads that wait on a busy core spin. One intra-op thread each; a test that
# wants more asks (ModelOptions.torch_threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _hermetic_peerd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A developer's PEERD_* variables (PEERD_HOME above all) must not leak into tests;
    a test that wants one sets it with monkeypatch. PEERD_CACHE_DIR stays the suite's,
    and PEERD_AUDIT_RATE is 0."""
    for name in list(os.environ):
        if name.startswith("PEERD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PEERD_CACHE_DIR", _CACHE)
    # the peers a test starts (testnets, daemons) audit no routes in the background:
    # an audit's passes and sessions, at random, would move what tests count (sessions
    # open on a replica, say). tests/test_audit.py audits on purpose.
    monkeypatch.setenv("PEERD_AUDIT_RATE", "0")
    yield


@pytest.fixture(autouse=True, scope="session")
def _quiet_libp2p() -> None:
    # py-libp2p logs routine churn at INFO (some modules, e.g. the auto-connector,
    # set their own logger's level, so the parent's level is not enough). Errors stay.
    import peerd.node  # noqa: F401  (imports the libp2p modules that create loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("libp2p", "multiaddr", "async_service"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Trio nests failures in exception groups deeper than pytest prints (each
    libp2p service adds a level): append the leaf exceptions to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, BaseExceptionGroup):
        text = "\n".join("".join(traceback.format_exception(leaf)) for leaf in _leaves(exc))
        report.sections.append(("exception group leaves", text))
