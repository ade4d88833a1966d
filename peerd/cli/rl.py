"""`peerd rl`: RL post-training with the swarm as samplers (peerd/rl/).

`train` asks the local daemon to run a GRPO run (`POST /v1/rl/runs`) and follows it
live; `status` shows runs; `eval` scores a policy greedily on held-out questions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import client_options, console, emit, err_console, fail, make_client

POLL_S = 0.5


@click.group()
def rl() -> None:
    """RL post-training: a GRPO trainer here, rollouts from the swarm's samplers."""


@rl.command()
@client_options
@click.option("--model", "model", metavar="SPEC", required=True,
              help="The policy: the model the samplers serve (e.g. smollm2).")
@click.option("--task", default="add", show_default=True,
              help="add, gsm8k (its training split) or FILE.jsonl of {prompt, answer} rows.")
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True, help="sync: every rollout on-policy (sequential pull); "
              "async: samplers run ahead up to --staleness versions (push-pull).")
@click.option("--samplers", default="auto", show_default=True, metavar="auto|N",
              help="Sampler peers to use: every one found, or wait for N.")
@click.option("--group", type=int, default=4, show_default=True, help="Completions a prompt.")
@click.option("--batch", type=int, default=8, show_default=True, help="Prompts a step.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--staleness", type=int, default=1, show_default=True,
              help="async: the most versions a rollout may lag when it is trained on.")
@click.option("--update", type=click.Choice(["full", "lora"]), default="full",
              show_default=True, help="Train every weight, or LoRA adapters (only they "
              "travel to the samplers).")
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--ranks", type=int, default=1, show_default=True,
              help="Learner processes on this machine: N > 1 trains under torchrun as "
              "DDP (gloo on CPU), the peer's --torch-threads shared among them (1..8, at "
              "most --group).")
@click.option("--kl", type=float, default=0.0, show_default=True,
              help="k3 KL penalty to the reference policy (0: none).")
@click.option("--max-tokens", type=int, default=16, show_default=True,
              help="Most tokens a completion.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--run-id", default="", help="Name the run [a fresh id].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run dir: checkpoints, metrics.jsonl, reward.png [<data dir>/rl/<run id>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out (or --run-id) from "
              "its last checkpoint, at the same step and version.")
@click.option("--memory-scecs", type=int, default=256, show_default=True,
              help="Trained groups this run keeps in the trainer's memory as admission "
              "tasks (one SCEC a group; 0: none).")
def train(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
          model: str, task: str, mode: str, samplers: str, group: int, batch: int,
          steps: int, staleness: int, update: str, lora_rank: int, lr: float, ranks: int,
          kl: float, max_tokens: int, temperature: float, seed: int, run_id: str, out: Path | None,
          resume: bool, memory_scecs: int) -> None:
    """Train MODEL by GRPO on TASK with the swarm's rollout samplers, live."""
    if samplers != "auto" and not samplers.isdigit():
        fail(f"--samplers {samplers!r}: give auto or a number", 2)
    body: dict[str, Any] = {
        "model": model, "task": task, "mode": mode,
        "samplers": 0 if samplers == "auto" else int(samplers), "group": group,
        "batch": batch, "steps": steps, "staleness": staleness, "update": update,
        "lora_rank": lora_rank, "lr": lr, "ranks": ranks, "kl": kl, "max_tokens": max_tokens,
        "temperature": temperature, "seed": seed, "run_id": run_id, "resume": resume,
        "out": str(out.resolve()) if out else "", "memory_scecs": memory_scecs,
    }
    if task.endswith(".jsonl"):
        body["task"] = str(Path(task).resolve())
    c = make_client(data_dir, api, token)
    run = c.request("POST", "/v1/rl/runs", body)
    path = f"/v1/rl/runs/{quote(run['id'], safe='')}"
    if as_json:
        while run["state"] not in ("done", "failed", "stopped"):
            time.sleep(POLL_S)
            run = c.request("GET", path)
        click.echo(json.dumps(run, indent=2, sort_keys=True))
    else:
        try:
            with Live(_progress(run), console=console, refresh_per_second=4,
                      transient=True) as live:
                while run["state"] not in ("done", "failed", "stopped"):
                    time.sleep(POLL_S)
                    run = c.request("GET", path)
                    live.update(_progress(run))
        except KeyboardInterrupt:  # stop the run too, cleanly: it can be resumed
            console.print("stopping the run after the step in hand (resume it with "
                          "--resume)...")
            c.request("POST", f"{path}/stop")
            while run["state"] not in ("done", "failed", "stopped"):
                time.sleep(POLL_S)
                run = c.request("GET", path)
        _summary(run)
    if run["state"] != "done":
        raise SystemExit(1)


@rl.command()
@client_options
@click.argument("run_id")
def stop(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         run_id: str) -> None:
    """Stop RUN_ID after the step in hand, with a checkpoint (`train --resume` goes on)."""
    c = make_client(data_dir, api, token)
    emit(c.request("POST", f"/v1/rl/runs/{quote(run_id, safe='')}/stop"), as_json,
         lambda r: console.print(f"run {escape(r['id'])}: stopping after step "
                                 f"{r['step']} ({r['state']})", highlight=False))


@rl.command()
@client_options
@click.argument("run_id", required=False)
def status(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
           run_id: str | None) -> None:
    """The daemon's RL runs, or one run in full."""
    c = make_client(data_dir, api, token)
    if run_id:
        emit(c.request("GET", f"/v1/rl/runs/{quote(run_id, safe='')}"), as_json, _summary)
        return

    def render(runs: list[dict[str, Any]]) -> None:
        if not runs:
            console.print("no RL runs on this peer (start one with `peerd rl train`)")
            return
        table = Table("run", "state", "mode", "step", "version", "reward", "samples/s")
        for r in runs:
            table.add_row(escape(r["id"]), r["state"], r["spec"]["mode"],
                          f"{r['step']}/{r['spec']['steps']}", str(r["version"]),
                          _fmt(r["last"].get("reward")), _fmt(r["samples_per_s"]))
        console.print(table)

    emit(c.request("GET", "/v1/rl/runs"), as_json, render)


@rl.command("eval")
@click.option("--model", "model", metavar="SPEC", required=True,
              help="The base model (the run's --model).")
@click.option("--task", default="add", show_default=True,
              help="add, gsm8k (its test split) or FILE.jsonl: its held-out questions.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Evaluate this run dir's latest checkpoint.")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(file_okay=False,
              path_type=Path), help="Evaluate this checkpoint dir (RUN/checkpoints/step-N).")
@click.option("-n", "n", type=click.IntRange(1), metavar="N",
              help="The first N held-out questions [100, or all the task has if fewer].")
@click.option("--max-tokens", type=click.IntRange(1), default=16, show_default=True,
              help="Most tokens an answer.")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True,
              help="Questions decoded together (left-padded; float rounding may then "
                   "flip a near-tie, so 1 answers each exactly as alone).")
@click.option("--torch-threads", type=click.IntRange(1), help="torch threads [all cores].")
@click.option("--details", is_flag=True, help="Every question's answer too.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(model: str, task: str, run_dir: Path | None, checkpoint_dir: Path | None,
          n: int | None, max_tokens: int, batch_size: int, torch_threads: int | None,
          details: bool, as_json: bool) -> None:
    """Score a policy greedily on TASK's held-out questions (never trained on), here in
    this process: the base MODEL, or the policy a run trained (--run/--checkpoint)."""
    from peerd.rl.tasks import load_task

    if run_dir is not None and checkpoint_dir is not None:
        fail("give --run or --checkpoint, not both", 2)
    try:
        the_task = load_task(task, seed=0)  # held-out questions do not depend on the seed
        size = the_task.heldout_size()
        if size == 0:
            fail(f"task {task!r} has no held-out questions")
        count = n if n is not None else min(100, size)
        if count > size:
            fail(f"-n {count}: task {task!r} has {size} held-out questions", 2)
        if run_dir is not None:
            from peerd.rl.checkpoint import latest_checkpoint

            checkpoint_dir = latest_checkpoint(run_dir)
    except ValueError as exc:
        fail(str(exc))
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from peerd.inference.model.source import ModelError
    from peerd.rl.evaluate import evaluate, load_policy

    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        policy = load_policy(model, checkpoint_dir)
    except (ModelError, ValueError, OSError) as exc:
        fail(str(exc))
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        job = bar.add_task("answering", total=count)
        result = evaluate(policy.model, policy.tokenizer, the_task, count, max_tokens,
                          batch_size=batch_size,
                          progress=lambda done, _all: bar.update(job, completed=done))
    out = {**result.to_json(details=details), "model": model, "max_tokens": max_tokens,
           "batch_size": batch_size,
           "checkpoint": str(policy.checkpoint) if policy.checkpoint else None,
           "step": policy.step, "version": policy.version, "update": policy.update}

    def render(data: dict[str, Any]) -> None:
        low, high = data["interval"]
        table = Table("task", "policy", "n", "accuracy", "95% interval", "format",
                      "mean reward", title="held-out evaluation (greedy)")
        policy_name = (f"step {data['step']} ({data['update']})" if data["checkpoint"]
                       else "base model")
        table.add_row(escape(data["task"]), escape(policy_name), str(data["n"]),
                      f"{100 * data['accuracy']:.1f}%",
                      f"{100 * low:.1f}% - {100 * high:.1f}%",
                      f"{100 * data['format_rate']:.1f}%", f"{data['mean_reward']:.3f}")
        console.print(table)
        if data["checkpoint"]:
            console.print(f"checkpoint {escape(data['checkpoint'])}", highlight=False)
        if details:
            answers = Table("question", "expected", "answer", "reward")
            for r in data["results"]:
                answers.add_row(escape(r["prompt"][:60]), escape(r["expected"]),
                                escape(repr(r["completion"])[:60]), f"{r['reward']:.1f}")
            console.print(answers)

    emit(out, as_json, render)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _progress(run: dict[str, Any]) -> Table:
    last = run.get("last", {})
    table = Table(title=f"run {escape(run['id'])}: {run['state']}", show_header=True)
    for col in ("step", "version", "reward", "staleness", "samples/s", "sync s",
                "samplers", "refused"):
        table.add_column(col)
    if run.get("waiting_for"):
        table.caption = f"waiting for {escape(run['waiting_for'])}"
    elif run.get("phase"):
        table.caption = escape(run["phase"])
    refused = ", ".join(f"{k} {v}" for k, v in run.get("refused", {}).items()) or "0"
    table.add_row(f"{run['step']}/{run['spec']['steps']}", str(run["version"]),
                  _fmt(last.get("reward")), _fmt(last.get("staleness")),
                  _fmt(run["samples_per_s"]), _fmt(last.get("sync_s")),
                  str(len(run.get("samplers", []))), refused)
    return table


def _summary(run: dict[str, Any]) -> None:
    console.print(_progress(run))
    if run.get("error"):
        console.print(f"[red]{escape(run['error'])}[/]", highlight=False)
    console.print(f"elapsed {run['elapsed_s']:.1f} s, {run['samples']} samples, trainer "
                  f"idle {run['trainer_idle_s']:.1f} s, skipped groups "
                  f"{run['skipped_groups']}", highlight=False)
    for key in ("dir", "plot", "metrics"):
        if run.get(key):
            console.print(f"{key:8} {escape(run[key])}", highlight=False)
