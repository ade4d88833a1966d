"""The demo's plan step (Gradientsys): a goal reached with the swarm's typed tools.

`peerd plan GOAL --tools calculator --follow` on peer0: the swarm's model (here the
3-stage pipeline) writes each step under the tools' grammar (a thought, then calls
with arguments of the tool's type, or an answer), the calls go to the peers that offer
the tool (every peer offers the calculator), and each step, call and result are shown
as they happen. Under the grammar SmolLM2-135M's every step parses and its first call
is the right one; knowing when it is done is beyond a model this small (it calls the
calculator again on the results' ids until the step budget stops it), so a plan here
usually ends "failed: budget_steps" in words, having shown the machinery
(bench/README.md, "Plans (Gradientsys)": the same holds on BFCL's questions).

    from demo_plan import demo_plan
    demo_plan(console, peer, steps=2)    # True if the plan answered
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from rich.console import Console

from testnet import launcher

GOAL = "What is 23 * 47? Use the calculator."


def demo_plan(console: Console, peer: launcher.PeerInfo, steps: int, goal: str = GOAL,
              tokens: int = 400) -> bool:
    args = ["plan", goal, "--tools", "calculator", "--steps", str(steps), "--tokens",
            str(tokens), "--follow", "--data-dir", peer.data_dir]
    console.print(f"[dim]$ peerd {shlex.join(args[:-2])}[/] (on {peer.name})",
                  highlight=False)
    result = subprocess.run([sys.executable, "-m", "peerd.cli", *args],
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode == 0:
        return True
    # exit 1: the plan ended without an answer (its reason is above), or the CLI failed
    latest = launcher.api_request(peer, "GET", "/v1/plans")[:1]
    if not latest or latest[0]["goal"] != goal or latest[0]["status"] != "failed":
        return False
    console.print("[dim]every step parsed and every call was typed; knowing when the "
                  "goal is reached is beyond SmolLM2-135M[/]")
    return True
