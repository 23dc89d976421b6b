"""`asya-mesh`: the command line of the mesh API's external port (docs/cli.md).

`main(argv)` parses the command, runs it against `MeshApi` and returns the exit status; every
failure arrives here as a `CliError` and is printed as one line on stderr. Human output goes
through rich (tables, pretty JSON); `--json` writes exactly one compact JSON document per
command to stdout, or one per SSE frame and line for `events`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from ._api import EXIT_CLIENT, EXIT_SERVER, CliError, MeshApi, frame_data
from ._watch import watch

DEFAULT_URL: Final = "http://127.0.0.1:8080/api/v1"
EXIT_INTERRUPTED: Final = 130

EPILOG: Final = f"""\
exit statuses:
  0  done (for watch: the envelope succeeded)
  1  watch: the envelope failed
  {EXIT_CLIENT}  usage error, or the API refused the request (4xx, e.g. 404 unknown id, 400)
  3  watch: the envelope was canceled
  {EXIT_SERVER}  server error (5xx), the API could not be reached, or a stream was cut off
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

The API's URL (with its prefix) comes from --url, else ASYA_MESH_URL, else {DEFAULT_URL}.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asya-mesh",
        description="Create, read, list, cancel and follow envelopes of an asya mesh API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("ASYA_MESH_URL", DEFAULT_URL),
        help="the external port's API root (default: $ASYA_MESH_URL or %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output: one JSON document"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="create an envelope for ACTOR; prints its id")
    create.add_argument("actor", metavar="ACTOR")
    payload = create.add_mutually_exclusive_group()
    payload.add_argument("--payload", metavar="JSON", help="the payload, as JSON")
    payload.add_argument(
        "--payload-file", metavar="F", help="read the payload JSON from F (- is stdin)"
    )
    create.add_argument("--timeout", type=float, metavar="S", help="deadline in seconds")
    create.add_argument("--namespace", metavar="N", help="queue namespace for this envelope")
    create.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="envelope header (repeatable)"
    )

    get = commands.add_parser("get", help="print one envelope")
    get.add_argument("id", metavar="ID")

    list_ = commands.add_parser("list", help="list envelopes, newest first")
    list_.add_argument("--status", metavar="S", help="only envelopes with status S")
    list_.add_argument("--limit", type=int, metavar="N", help="page size (1..1000, default 100)")
    list_.add_argument("--offset", type=int, metavar="N", help="skip the N newest")

    cancel = commands.add_parser("cancel", help="cancel an envelope (no-op once it has ended)")
    cancel.add_argument("id", metavar="ID")

    events = commands.add_parser("events", help="print the envelope's SSE frames as they come")
    events.add_argument("id", metavar="ID")

    watch_ = commands.add_parser(
        "watch",
        help="follow an envelope live; exit 0 succeeded, 1 failed, 3 canceled",
    )
    watch_.add_argument("id", metavar="ID")
    return parser


def _create_body(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    text: str | None = args.payload
    if args.payload_file is not None:
        try:
            if args.payload_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.payload_file, encoding="utf-8") as file:
                    text = file.read()
        except OSError as exc:
            parser.error(f"--payload-file: {exc}")
    if text is not None:
        try:
            body["payload"] = json.loads(text)
        except ValueError as exc:
            parser.error(f"the payload is not JSON: {exc}")
    if args.header:
        headers = {}
        for item in args.header:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"--header wants K=V, not {item!r}")
            headers[key] = value
        body["headers"] = headers
    if args.timeout is not None:
        body["timeout"] = args.timeout
    return body


def _envelope_table(reply: dict[str, Any]) -> Table:
    table = Table(box=None)
    table.add_column("id", no_wrap=True)  # whole, to be copied
    table.add_column("status")
    table.add_column("actor")
    table.add_column("created_at", no_wrap=True)
    for item in reply.get("messages", []):
        data = item.get("data") if isinstance(item.get("data"), dict) else {}
        table.add_row(
            str(item.get("id", "")),
            str(item.get("status", "")),
            str(data.get("actor", "")),
            str(item.get("created_at", "")),
        )
    return table


def _run(
    parser: argparse.ArgumentParser, args: argparse.Namespace, api: MeshApi, err: Console
) -> int:
    out = Console(file=sys.stdout)

    def emit(document: Any) -> None:
        sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")

    if args.command == "create":
        envelope_id = api.create(args.actor, _create_body(parser, args), args.namespace)
        if args.json:
            emit({"id": envelope_id})
        else:
            out.print(envelope_id, markup=False, highlight=False)
    elif args.command == "get":
        envelope = api.get(args.id)
        if args.json:
            emit(envelope)
        else:
            out.print_json(data=envelope)
    elif args.command == "list":
        reply = api.list(args.status, args.limit, args.offset)
        if args.json:
            emit(reply)
        else:
            if not out.is_terminal:  # not cut to 80 columns: ids must stay whole
                out = Console(file=sys.stdout, width=1000)
            out.print(_envelope_table(reply))
            shown = len(reply.get("messages", []))
            out.print(f"{shown} of {reply.get('total', shown)}", highlight=False)
    elif args.command == "cancel":
        api.cancel(args.id)
        # DELETE answers 204 also for an envelope that had already ended: say which it was.
        status = api.get(args.id).get("status")
        if args.json:
            emit({"id": args.id, "status": status})
        else:
            out.print(f"{args.id} {status}", markup=False, highlight=False)
    elif args.command == "events":
        for event in api.events(args.id):
            if args.json:
                frame = {"event": event.event, "data": frame_data(event)}
                emit(frame | ({"id": event.id} if event.id is not None else {}))
            else:
                sys.stdout.write(f"{event.event} {event.data}\n")
            sys.stdout.flush()
    else:
        return watch(api, args.id, sys.stdout, err, as_json=args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `asya-mesh` command; returns the exit status (see `EPILOG`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    err = Console(file=sys.stderr)
    api = MeshApi(args.url)
    try:
        return _run(parser, args, api, err)
    except CliError as exc:
        err.print(f"asya-mesh: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        api.close()
