"""`asya-mesh watch`: follow one envelope's event stream until it ends.

`Follow` folds the stream into what a person wants to see: the status, `progress_percent` and
the route (`prev`/`curr`/`next`), from the catch-up frame (the whole envelope, fields under
`data`) and from live status frames (the event data at the top level); FLY frames become text,
the `token` of `{"token": ...}` data as is, any other data as a JSON line.

Two displays show it. On a terminal, a rich `Live` area holds the line of tokens being written
above a progress bar; a line that is complete (a newline, or as wide as the terminal) is printed
above the live area, into the scrollback. Anywhere else (a pipe, a file), tokens are written to
stdout as they come and nothing else is, so `watch ID > out.txt` keeps just the text.

The exit status says how the envelope ended (`EXIT_BY_STATUS`); a stream that ends before a
terminal status (the server went away) is a server error.
"""

from __future__ import annotations

import json
from typing import Any, Final, TextIO

import attrs
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

from mesh_proto import SseEvent

from ._api import EXIT_SERVER, CliError, MeshApi, frame_data

EXIT_BY_STATUS: Final = {"succeeded": 0, "failed": 1, "canceled": 3}


@attrs.define(eq=False)
class Follow:
    """What is known of the envelope so far (see the module comment)."""

    status: str = "pending"
    percent: float | None = None
    route: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in EXIT_BY_STATUS

    def status_frame(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        fields = data.get("data") if "created_at" in data else data  # catch-up: the envelope
        if isinstance(data.get("status"), str):
            self.status = data["status"]
        if not isinstance(fields, dict):
            return
        if isinstance(fields.get("progress_percent"), int | float):
            self.percent = float(fields["progress_percent"])
        for key in ("prev", "curr", "next"):
            if key in fields:
                self.route[key] = fields[key]
        if fields.get("error") is not None:
            self.error = str(fields["error"])

    def route_text(self) -> str:
        """The route as rich markup: done hops dim, the current one bold."""
        prev, nxt = self.route.get("prev"), self.route.get("next")
        curr = self.route.get("curr")
        hops = [f"[dim]{escape(str(a))}[/]" for a in (prev if isinstance(prev, list) else [])]
        if curr is not None:
            hops.append(f"[bold]{escape(str(curr))}[/]")
        hops += [escape(str(a)) for a in (nxt if isinstance(nxt, list) else [])]
        return " → ".join(hops)

    def outcome(self) -> str:
        return (
            f"{self.status}: {self.error}"
            if self.status == "failed" and self.error
            else self.status
        )


def fly_text(data: Any) -> str:
    """What a FLY frame shows: its token, else its data as one JSON line."""
    if isinstance(data, dict) and isinstance(data.get("token"), str):
        return str(data["token"])
    return json.dumps(data, ensure_ascii=False) + "\n"


class _Screen:
    """The terminal display: the line being written above a progress bar."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.line = Text()
        self.progress = Progress(
            TextColumn("{task.fields[status]}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task: TaskID = self.progress.add_task("", total=100, status="pending")
        self.live = Live(Group(self.line, self.progress), console=console, refresh_per_second=12)

    def show(self, follow: Follow) -> None:
        self.progress.update(
            self.task,
            completed=follow.percent or 0.0,
            description=follow.route_text(),
            status=follow.status,
        )

    def write(self, text: str) -> None:
        self.line.append(text)
        width = max(self.console.width, 20)
        while "\n" in self.line.plain or len(self.line.plain) >= width:
            plain = self.line.plain
            cut = plain.find("\n", 0, width)
            if cut < 0:
                space = plain.rfind(" ", 0, width)
                cut = space if space > 0 else width
            self.console.print(plain[:cut], markup=False, highlight=False)
            self.line.plain = (
                plain[cut + 1 :] if plain[cut : cut + 1] in ("\n", " ") else plain[cut:]
            )

    def finish(self) -> None:
        if self.line.plain:
            self.console.print(self.line.plain, markup=False, highlight=False)
            self.line.plain = ""


def watch(api: MeshApi, envelope_id: str, out: TextIO, err: Console, *, as_json: bool) -> int:
    """Follow `envelope_id` until it ends; returns the exit status for how it ended.

    Raises:
        CliError: the API refused (404, ...), could not be reached, or ended the stream before
            the envelope ended.
    """
    follow = Follow()
    console = Console(file=out)
    screen = _Screen(console) if console.is_terminal and not as_json else None
    wrote = ""
    events = api.events(envelope_id)
    try:
        if screen is not None:
            screen.live.start()
        for event in events:
            wrote = _apply(event, follow, screen, out, as_json=as_json) or wrote
            if follow.ended:
                break
    finally:
        events.close()
        if screen is not None:
            screen.finish()
            screen.live.stop()
    if not follow.ended:
        raise CliError(
            f"the stream of {envelope_id} ended while it was {follow.status}", EXIT_SERVER
        )
    if as_json:
        out.write(json.dumps(api.get(envelope_id), ensure_ascii=False) + "\n")
    else:
        if screen is None and wrote and not wrote.endswith("\n"):
            out.write("\n")
        err.print(follow.outcome(), markup=False, highlight=False)
    return EXIT_BY_STATUS[follow.status]


def _apply(
    event: SseEvent, follow: Follow, screen: _Screen | None, out: TextIO, *, as_json: bool
) -> str:
    """Show one event; returns the text written to `out` (empty when none)."""
    data = frame_data(event)
    if event.event == "status":
        follow.status_frame(data)
        if screen is not None:
            screen.show(follow)
        return ""
    if event.event != "fly" or as_json:
        return ""
    text = fly_text(data)
    if screen is not None:
        screen.write(text)
    else:
        out.write(text)
        out.flush()
    return text
