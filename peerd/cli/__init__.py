"""The `peerd` command line: run a peer, and administer the local one over its API.

Every command that prints data prints a readable table, or JSON with `--json`. A bad
flag or setting is one line naming it, exit code 2; a daemon that does not answer
says how to start one.

Each command module defines its commands on its own, knowing nothing of `main`;
`COMMANDS` below is the one place that puts them under `peerd`. A system's CLI group
(a `click.Group` in its own folder) joins the same way: import it here and add it to
`COMMANDS`. Command modules import torch, transformers and the inference wing only
inside the commands that need them, so that `peerd status` starts fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from peerd import __version__
from peerd.cli.admin import advertise, events, forgive, id_, ledger, peers, status
from peerd.cli.cache import cache
from peerd.cli.client import fail
from peerd.cli.draft import draft
from peerd.cli.generate import chat, generate
from peerd.cli.memory import memory
from peerd.cli.plan import plan
from peerd.cli.rl import rl
from peerd.cli.shards import shards
from peerd.cli.start import start
from peerd.cli.task import task
from peerd.cli.tools import tools
from peerd.cli.ui import ui

COMMANDS: tuple[click.Command, ...] = (
    start,
    id_, status, peers, ledger, events, advertise, forgive,
    generate, chat, shards,
    draft, cache,
    task,
    rl,
    memory,
    tools,
    plan,
    ui,
)


class Group(click.Group):
    """Usage errors as one line (plus a hint), exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            fail(f"{exc.format_message()}{hint}", 2)
        except click.Abort:
            fail("aborted", 130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)


@click.group(cls=Group, commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peerd")
def main() -> None:
    """peerd: a peer-to-peer daemon for decentralized LLM work."""
