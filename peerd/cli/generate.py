"""Generation through the local daemon's OpenAI API: `peerd generate` and `peerd chat`.

stdout carries the answer alone; the route, speed and drafting line goes to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import (
    Client,
    CompletionFailed,
    client_options,
    connection_options,
    console,
    err_console,
    fail,
    make_client,
    post_completion,
    stream_completion,
)
from peerd.inference.options import (
    DRAFT_KINDS,
    MAX_COMPLETION_LOGPROBS,
    MAX_GAMMA,
    MAX_TOP_LOGPROBS,
    VERIFY_CHOICES,
    spoken,
)


def served_model(c: Client) -> str:
    """The model the local daemon serves; one line and exit 1 if none is ready."""
    m = c.request("GET", "/status").get("model") or {}
    state = m.get("state", "none")
    if state == "ready" and m.get("model_id"):
        return str(m["model_id"])
    if state == "loading":
        fail(f"the daemon at {c.api} is still loading {m.get('spec', 'its model')} "
             f"({m.get('phase') or 'starting'}); try again shortly")
    if state == "failed":
        fail(f"the daemon at {c.api} failed to load its model ({m.get('error', '?')}); see "
             "its log, or restart it with another --model")
    fail(f"the daemon at {c.api} serves no model; restart it with `peerd start --model SPEC` "
         "(e.g. --model smollm2)")


def answer_text(response: dict[str, Any]) -> str:
    choice = (response.get("choices") or [{}])[0]
    if "message" in choice:
        return str(choice["message"].get("content") or "")
    return str(choice.get("text") or "")


def route_line(c: Client, response: dict[str, Any]) -> str:
    """route alpha [0, 2) -> beta [2, 4) · 41.3 tokens/s · 5 tokens"""
    info = response.get("peerd") or {}
    names = c.peer_names()
    hops = " -> ".join(f"{names.get(h['peer_id']) or h['peer_id'][-8:]} "
                       f"[{h['layers'][0]}, {h['layers'][1]})"
                       for h in info.get("route", []))
    tokens = (response.get("usage") or {}).get("completion_tokens", "?")
    finish = (response.get("choices") or [{}])[0].get("finish_reason")
    spec = info.get("speculative") or {}
    drafted = ""
    if spec.get("draft", "none") != "none":
        shape = f", trees of {spec.get('mean_nodes', 0.0):.0f} nodes" if spec.get("tree") else ""
        drafted = (f" | {spec['draft']}/{spec.get('verify')}: {spec.get('rounds', 0)} rounds, "
                   f"{spec.get('tokens_per_round', 0.0):.2f} tokens/round{shape}, "
                   f"{spec.get('draft_ms', 0.0):.0f} ms drafting")
    return (f"route {hops or '?'} | {info.get('tokens_per_s', 0.0):.1f} tokens/s | "
            f"{tokens} tokens" + (f" ({finish})" if finish else "") + drafted)


def note(text: str) -> None:
    """A dim line on stderr, so that stdout carries the answer alone."""
    err_console.print(text, style="dim", highlight=False, markup=False, soft_wrap=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command()
@client_options
@click.argument("prompt")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1, 8192),
              help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2),
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass [1].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Sampling seed [random].")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable, up to 4).")
@click.option("--stream/--no-stream", default=False, help="Print tokens as they arrive.")
@click.option("--raw", is_flag=True, help="Send the prompt as is (/v1/completions), "
              "not as a chat message.")
@click.option("--model", "model_id", metavar="ID", help="[the model the daemon serves]")
@click.option("--draft", metavar="DRAFTER", help="Decode speculatively: "
              f"{spoken(DRAFT_KINDS)} "
              "[the daemon's --speculative].")
@click.option("--verify", type=click.Choice(VERIFY_CHOICES),
              help="How drafts are verified [auto: greedy at temperature 0, else sample].")
@click.option("--gamma", metavar="N|auto", help="Tokens drafted per round (a tree's "
              f"depth), 1-{MAX_GAMMA} [auto].")
@click.option("--tree/--chain", default=None, help="Draft a token tree (eagle, greedy or "
              "adaptive) or a single chain [tree].")
@click.option("--logprobs", "top", type=click.IntRange(0, MAX_TOP_LOGPROBS), metavar="N",
              help="Show each token's log-probability and its N most likely alternatives "
              f"(0-{MAX_TOP_LOGPROBS}; with --raw 0-{MAX_COMPLETION_LOGPROBS}).")
def generate(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
             prompt: str, max_tokens: int, temperature: float, top_p: float | None,
             seed: int | None, stop: tuple[str, ...], stream: bool, raw: bool,
             model_id: str | None, draft: str | None, verify: str | None,
             gamma: str | None, tree: bool | None, top: int | None) -> None:
    """Generate text from PROMPT through the swarm."""
    if raw and top is not None and top > MAX_COMPLETION_LOGPROBS:
        fail(f"with --raw, --logprobs takes 0-{MAX_COMPLETION_LOGPROBS} (the completions "
             "API's limit)", 2)
    c = make_client(data_dir, api, token)
    body: dict[str, Any] = {"model": model_id or served_model(c), "max_tokens": max_tokens,
                            "temperature": temperature}
    if draft is not None or verify is not None or gamma is not None or tree is not None:
        if gamma not in (None, "auto") and not gamma.isdigit():
            fail(f"--gamma takes an integer 1-{MAX_GAMMA} or auto", 2)
        spec: dict[str, Any] = {}  # what is left out, the daemon's default fills in
        if draft is not None:
            spec["draft"] = draft
        if verify is not None:
            spec["verify"] = verify
        if gamma is not None:
            spec["gamma"] = gamma if gamma == "auto" else int(gamma)
        if tree is not None:
            spec["tree"] = tree
        body["speculative"] = spec
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if top is not None:
        body.update({"logprobs": top} if raw else {"logprobs": True, "top_logprobs": top})
    if raw:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    try:
        if stream:
            response = stream_completion(c, path, body, (lambda _: None) if as_json else _write)
            if not as_json:
                _write("\n")
        else:
            response = post_completion(c, path, body)
            if not as_json:
                click.echo(answer_text(response))
    except CompletionFailed as exc:
        if stream and not as_json:
            _write("\n")
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(response, indent=2, sort_keys=True))
    else:
        if top is not None:
            console.print(logprobs_table(response))
        note(route_line(c, response))


def token_rows(logprobs: dict[str, Any] | None) -> list[tuple[str, float, dict[str, float]]]:
    """(token, log-probability, alternatives) from either API's logprobs object."""
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [(e["token"], e["logprob"], {a["token"]: a["logprob"]
                                              for a in e.get("top_logprobs") or []})
                for e in logprobs["content"] or []]
    return [(t, lp, alts or {}) for t, lp, alts in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
        strict=True)]


def logprobs_table(response: dict[str, Any]) -> Table:
    choice = (response.get("choices") or [{}])[0]
    rows = token_rows(choice.get("logprobs"))
    t = Table(title=f"{len(rows)} tokens: log-probability, probability, alternatives")
    for column in ("token", "logprob", "p", "alternatives"):
        t.add_column(column, justify="right" if column in ("logprob", "p") else "left")
    for token, logprob, alternatives in rows:
        t.add_row(escape(repr(token)), f"{logprob:.3f}", f"{math.exp(logprob):.3f}",
                  escape("  ".join(f"{a!r} {lp:.2f}" for a, lp in alternatives.items())))
    return t


@click.command()
@connection_options
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1, 8192),
              help="Most tokens per answer.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
@click.option("--system", metavar="TEXT", help="A system message to start with.")
@click.option("--model", "model_id", metavar="ID", help="[the model the daemon serves]")
def chat(data_dir: Path | None, api: str | None, token: str | None, max_tokens: int,
         temperature: float, system: str | None, model_id: str | None) -> None:
    """Talk with the model; /reset forgets the conversation, /exit, Ctrl-D or Ctrl-C
    leave."""
    c = make_client(data_dir, api, token)
    model = model_id or served_model(c)
    interactive = sys.stdin.isatty()  # piped: no prompt, stdout is the answers alone
    try:  # from the first line out: Ctrl-C any time after it is a clean exit
        note(f"chatting with {model} at {c.api}; /reset forgets, /exit leaves")
        _converse(c, model, system, max_tokens, temperature, "> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
        if interactive:
            _write("\n")


def _converse(c: Client, model: str, system: str | None, max_tokens: int,
              temperature: float, prompt: str) -> None:
    """Read a line, stream the answer, repeat; returns on /exit or Ctrl-C during an answer
    (raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C at the prompt)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    shown: list[str] = []  # of the answer being streamed

    def show(piece: str) -> None:
        shown.append(piece)
        _write(piece)

    while True:
        line = input(prompt).strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(start)
            note("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "messages": history, "max_tokens": max_tokens,
                "temperature": temperature}
        shown.clear()
        try:
            response = stream_completion(c, "/v1/chat/completions", body, show)
        except CompletionFailed as exc:
            history.pop()  # the user can ask again
            if shown:
                _write("\n")
            err_console.print(f"[bold red]peerd:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            continue
        except KeyboardInterrupt:  # leaving mid-answer: end its line, then leave
            if shown:
                _write("\n")
            return
        _write("\n")
        history.append({"role": "assistant", "content": answer_text(response)})
        note(route_line(c, response))

