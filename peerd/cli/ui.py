"""`peerd ui`: the address of the local daemon's web view, with its API token.

The token is in the address once: the page swaps it for a cookie and takes it out of
the address bar (peerd/api/webui.py). A browser is opened only with `--open`.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import click

from peerd.cli.client import client_options, emit, err_console, fail, make_client


@click.command("ui")
@client_options
@click.option("--open", "open_", is_flag=True, help="Open the page in the default browser.")
def ui(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
       open_: bool) -> None:
    """The address of the web view (swarm, ledger, plans, tasks, routes), with the token."""
    c = make_client(data_dir, api, token)
    if not c.token:
        fail("no API token: pass --token, or --data-dir of the daemon (it keeps the token "
             "in <data dir>/api_token)")
    c.request("GET", "/status")  # the daemon answers, and takes this token
    url = f"{c.api}/ui?{urlencode({'token': c.token})}"
    opened = webbrowser.open(url) if open_ else False

    def render(d: dict[str, Any]) -> None:
        click.echo(d["url"])
        if open_ and not d["opened"]:
            err_console.print("no browser could be opened here: open the address above",
                          highlight=False)

    emit({"url": url, "api": c.api, "opened": opened}, as_json, render)
