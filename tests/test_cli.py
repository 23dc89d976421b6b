"""The two commands over real processes: `--help` and `--version`, usage errors, start-up
failures as one line on stderr, an unreachable state proxy at start, and the README's settings
table against the schema it is generated from."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import trio

from mesh_trio._config import SETTINGS
from mesh_trio.stateproxy._settings import SETTINGS as PROXY_SETTINGS
from tests.harness import http
from tests.proto._support import gen_docs

ROOT = Path(__file__).resolve().parent.parent
MESH = [str(Path(sys.executable).with_name("asya-mesh-api"))]
PROXY = [sys.executable, "-c", "from mesh_trio.stateproxy._cli import main; main()"]


def environment(**settings: str) -> dict[str, str]:
    """The test's environment without any setting of either program, then `settings`."""
    names = {s.env for s in SETTINGS} | {s.env for s in PROXY_SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    return {**env, "ASYA_MESH_HOST": "127.0.0.1", **settings}


def run(command: list[str], *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        env=environment(**settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_mesh_help_lists_every_setting_with_default_and_meaning() -> None:
    done = run(MESH, "--help")
    assert done.returncode == 0, done.stderr
    for setting in SETTINGS:
        plain = setting.shown_default.replace("`", "")
        assert f"  {setting.env} (default: {plain})\n" in done.stdout
        assert setting.meaning.replace("`", "") in done.stdout


def test_proxy_help_lists_every_setting_with_default_and_meaning() -> None:
    done = run(PROXY, "--help")
    assert done.returncode == 0, done.stderr
    for setting in PROXY_SETTINGS:
        assert f"  {setting.env} ({setting.shown_default})\n" in done.stdout
        assert setting.meaning in done.stdout
    assert "CONNECTOR_SOCKET (required)" in done.stdout


@pytest.mark.parametrize(
    ("command", "name"), [(MESH, "asya-mesh-api"), (PROXY, "asya-state-proxy")]
)
def test_version_is_the_package_version(command: list[str], name: str) -> None:
    done = run(command, "--version")
    assert (done.returncode, done.stdout) == (0, f"{name} {version('asya-mesh-api')}\n")


@pytest.mark.parametrize("command", [MESH, PROXY])
@pytest.mark.parametrize("args", [("--port", "1"), ("serve",)])
def test_unknown_arguments_are_a_usage_error(command: list[str], args: tuple[str, ...]) -> None:
    done = run(command, *args)
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr.splitlines()[-1]
    assert done.stdout == ""


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("asya-mesh-api: cannot start: "), lines
    return lines[0]


def test_external_port_in_use_is_one_line_naming_the_setting(busy_port: int) -> None:
    done = run(MESH, ASYA_MESH_EXTERNAL_PORT=str(busy_port), ASYA_MESH_INTERNAL_PORT="0")
    assert done.returncode == 1
    line = one_line(done)
    assert f"ASYA_MESH_EXTERNAL_PORT={busy_port}" in line and "in use" in line


def test_internal_port_in_use_ends_with_one_line_naming_the_setting(busy_port: int) -> None:
    # The external listener is already up and logs that before the internal one fails, so the
    # cause is the last line here; warning level leaves it the only one.
    done = run(
        MESH,
        ASYA_MESH_EXTERNAL_PORT="0",
        ASYA_MESH_INTERNAL_PORT=str(busy_port),
        ASYA_LOG_LEVEL="warning",
    )
    assert done.returncode == 1
    line = one_line(done)
    assert f"ASYA_MESH_INTERNAL_PORT={busy_port}" in line and "in use" in line


def test_unknown_host_is_one_line_naming_the_setting() -> None:
    done = run(MESH, ASYA_MESH_HOST="no.such.host.invalid")
    assert done.returncode == 1
    assert "ASYA_MESH_HOST='no.such.host.invalid'" in one_line(done)


def test_unwritable_sqlite_path_is_one_line_naming_the_file() -> None:
    done = run(
        MESH,
        ASYA_MESH_STORE="sqlite:/proc/no/such.db",
        ASYA_MESH_EXTERNAL_PORT="0",
        ASYA_MESH_INTERNAL_PORT="0",
    )
    assert done.returncode == 1
    assert "SQLite store '/proc/no/such.db'" in one_line(done)


def test_bad_setting_is_one_line_and_exit_2() -> None:
    done = run(MESH, ASYA_MESH_GRACEFUL_TIMEOUT="later")
    assert done.returncode == 2
    assert done.stderr.startswith("asya-mesh-api: configuration error: ASYA_MESH_GRACEFUL_TIMEOUT")
    assert done.stderr.count("\n") == 1


def test_sqs_without_credentials_is_one_line_and_exit_2() -> None:
    settings = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    done = subprocess.run(
        MESH,
        env={
            **{k: v for k, v in environment().items() if k not in settings},
            "ASYA_QUEUE_TRANSPORT": "sqs",
            "ASYA_SQS_REGION": "us-east-1",
            "ASYA_INTERNAL_URL": "http://mesh-api.test:8081",
            "ASYA_MESH_EXTERNAL_PORT": "0",
            "ASYA_MESH_INTERNAL_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "asya-mesh-api: configuration error: AWS_ACCESS_KEY_ID is not set"
        " (SQS requests must be signed)"
    )


async def test_unreachable_state_proxy_warns_and_the_server_still_answers(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "state.sock")
    process = await trio.lowlevel.open_process(
        MESH,
        env=environment(
            ASYA_STATEPROXY_SOCKET=missing,
            ASYA_MESH_EXTERNAL_PORT="0",
            ASYA_MESH_INTERNAL_PORT="0",
        ),
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    try:
        with trio.fail_after(20):
            while b"mesh API listening" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
        text = log.decode()
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        assert len(warnings) == 1 and f"ASYA_STATEPROXY_SOCKET={missing}" in warnings[0], text
        ports = re.search(
            r"external http://127\.0\.0\.1:(\d+), internal http://127\.0\.0\.1:", text
        )
        assert ports is not None, text
        external = int(ports[1])
        assert (await http(external, "GET", "/health")).status == 200
        assert (await http(external, "GET", "/ready")).status == 503
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            while chunk := await process.stderr.receive_some(4096):
                log += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in log.decode()


def test_readme_settings_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == gen_docs().render_readme(readme), (
        "README.md's settings table is stale: regenerate it with `python tools/gen_docs.py`"
    )


def test_readme_settings_table_lists_exactly_the_schema() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = readme.index("<!-- settings table"), readme.index("<!-- end of settings table")
    listed = re.findall(r"^\| `(\w+)` \|", readme[begin:end], flags=re.MULTILINE)
    assert listed == [setting.env for setting in SETTINGS]
    assert len(set(listed)) == len(listed)
