"""The repository stands alone: no pointer to documents outside it, no dead relative link, and
the deployment example names only settings the programs read."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mesh_trio._config import SETTINGS as MESH_SETTINGS
from mesh_trio.stateproxy._settings import SETTINGS as PROXY_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".py", ".md", ".toml", ".json", ".yaml")
# Spelled in pieces, so that this file does not contain what it looks for.
OUTSIDE = ("DESIGN" + ".md", "DESIGN" + " §", ".." + "/shared")
# Environment variables of the deployment example that neither program reads (none so far).
STANDARD_ENV: frozenset[str] = frozenset()

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = [name for name in listed.decode().split("\0") if name.endswith(TEXT_SUFFIXES)]
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_no_reference_to_documents_outside_the_repository() -> None:
    files = tracked_text_files()
    assert any(path.name == "contract.md" for path in files)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            found += [f"{where}: {word}" for word in OUTSIDE if word in line]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to `-`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return {slug(m.group(1)) for line in prose_lines(text) if (m := _HEADING.match(line))}


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):
                links.append(target)
    return links


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken, checked = [], 0
    for page in markdown_pages():
        for target in relative_links(page):
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert checked > 20
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_a_dead_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n[ok](#a-page) [dead](missing.md) [web](https://example.com)\n"
        "```\n[in code](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["#a-page", "missing.md"]
    assert anchors(page) == {"a-page"}
    assert slug("SSE: `GET {prefix}/mesh/{id}/events`") == "sse-get-prefixmeshidevents"


def manifest() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.M | re.S)
    assert len(blocks) == 1, "docs/deploy.md has one ```yaml manifest"
    return str(blocks[0])


def env_names(yaml: str) -> list[str]:
    """The names of the manifest's `env:` entries (`- name: X` under an `env:` key)."""
    names: list[str] = []
    env_indent: int | None = None
    for line in yaml.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if env_indent is not None and indent <= env_indent:
            env_indent = None
        if re.fullmatch(r"\s*env:\s*", line):
            env_indent = indent
        elif env_indent is not None and (m := re.fullmatch(r"\s*- name:\s*(\S+)\s*", line)):
            names.append(m.group(1).strip("\"'"))
    return names


def test_the_deployment_example_names_only_settings_the_programs_read() -> None:
    names = env_names(manifest())
    for needed in (
        "ASYA_STATEPROXY_SOCKET",
        "CONNECTOR_SOCKET",
        "STATE_PROXY_PG_URL",
        "STATE_PROXY_PG_INDEXES",
        "ASYA_INTERNAL_URL",
        "ASYA_MESH_GRACEFUL_TIMEOUT",
    ):
        assert needed in names
    # The settings schemas both programs parse their environment from (and print in --help).
    read = {setting.env for setting in MESH_SETTINGS} | {setting.env for setting in PROXY_SETTINGS}
    unread = [name for name in names if name not in STANDARD_ENV and name not in read]
    assert not unread, f"docs/deploy.md sets variables no program reads: {unread}"


def test_the_env_parser_reads_only_env_entries() -> None:
    yaml = (
        "containers:\n"
        "  - name: app\n"
        "    env:\n"
        "      - name: ONE\n"
        "        valueFrom:\n"
        "          secretKeyRef:\n"
        "            name: secret\n"
        "      - name: TWO\n"
        "    ports:\n"
        "      - name: http\n"
    )
    assert env_names(yaml) == ["ONE", "TWO"]


def test_the_grace_period_outlasts_both_drains() -> None:
    yaml = manifest()

    def setting(name: str) -> float:
        m = re.search(rf"- name: {name}\n\s*value: \"?([0-9.]+)(ms|s)?\"?\n", yaml)
        assert m is not None, name
        return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)

    period = re.search(r"terminationGracePeriodSeconds: (\d+)", yaml)
    assert period is not None
    drains = setting("ASYA_MESH_GRACEFUL_TIMEOUT") + setting("ASYA_STATE_PROXY_GRACE")
    assert int(period.group(1)) > drains
