"""Every shell block of README.md runs as written against a cluster started as `make up` does.

The test starts `vajra up` with its HTTP bridge in a temporary ``VAJRA_HOME`` on free loopback
ports, with an admin key in ``VAJRA_HTTP_ADMIN_KEY`` and the tiny model where `vajra up` keeps
it (``$VAJRA_HOME/models/tiny``; copied from the suite's fixture, built by the same function,
because building it takes a minute). It then runs the README's ``sh`` blocks in order in one
bash shell, as a reader pastes them into one terminal, with the variables the README tells the
reader to set (``VAJRA_HOME``, ``ADMIN``, ``VAJRA_URL``, ``VAJRA_HTTP_ADMIN_KEY``). The shell
runs in a temporary directory whose ``.venv/bin/`` holds this interpreter's ``vajra`` and
``python``, so the files the blocks write stay out of the repository; ``curl`` runs with
``--fail-with-body``, so an HTTP error fails its block like any failing command.

A block that cannot run here (``make up``, ``make test``, a minute-long benchmark, the lines
that set what the test sets itself) is preceded by ``<!-- readme-test: skip: REASON -->``;
the reason is required, and such a block may export only the variables this test provides.

Test rules: loopback only, free ports, every wait bounded; the cluster is stopped with
SIGTERM at the end and must exit 0, leaving no process behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (
    RunningCluster,
    cluster_pids,
    stop_cluster,
    vajra_env,
    wait_gone,
    wait_ready,
)

README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_LANGUAGES = {"sh", "bash", "shell"}
OTHER_LANGUAGES = {"python", "text", "toml", "json"}
ADMIN_KEY_ENV = "VAJRA_HTTP_ADMIN_KEY"
#: What the test sets for the blocks, as the README tells its reader to.
PROVIDED_VARIABLES = {"VAJRA_HOME", "ADMIN", "VAJRA_URL", ADMIN_KEY_ENV}
BLOCKS_TIMEOUT_S = 300.0
#: Starting takes seconds on an idle machine; a loaded 2-core one can take minutes.
READY_TIMEOUT_S = 420.0

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^`\s]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<kind>[a-z-]+)\s*(?::(?P<reason>.*?))?-->\s*$")
_EXPORT = re.compile(r"^\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # dedented by the fence's indent
    skip: str | None  # the reason given by a `readme-test: skip:` marker; None: runs


def fenced_blocks(markdown: str) -> list[Block]:
    """Every fenced block, with the skip marker on the last non-blank line before it.

    Raises ValueError for an unclosed fence, an unknown marker or one that precedes no block.
    """
    blocks: list[Block] = []
    lines = markdown.splitlines()
    pending: tuple[int, str] | None = None  # (line, reason) of a marker awaiting its block
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker is not None:
            if marker["kind"] != "skip":
                raise ValueError(f"line {i + 1}: unknown readme-test marker {marker['kind']!r}")
            pending = (i + 1, (marker["reason"] or "").strip())
        elif fence is not None:
            indent = fence["indent"]
            body: list[str] = []
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: code block never closed")
            skip = pending[1] if pending is not None else None
            blocks.append(Block(i + 1, fence["lang"], "\n".join(body) + "\n", skip))
            pending = None
            i = j
        elif line.strip() and pending is not None:
            raise ValueError(f"line {pending[0]}: readme-test marker not right before a block")
        i += 1
    if pending is not None:
        raise ValueError(f"line {pending[0]}: readme-test marker not right before a block")
    return blocks


def shell_blocks(markdown: str) -> list[Block]:
    return [b for b in fenced_blocks(markdown) if b.lang in SHELL_LANGUAGES]


def blocks_script(blocks: list[Block]) -> str:
    """One bash script running ``blocks`` in order, announcing each block and its success."""
    parts = [
        "set -eo pipefail",
        'curl() { command curl --fail-with-body --silent --show-error "$@"; }',
    ]
    for n, block in enumerate(blocks):
        parts.append(f"echo '### readme block {n} (README.md line {block.line})'")
        parts.append(block.text.rstrip("\n"))
        parts.append(f"echo '### readme block {n} ok'")
    return "\n".join(parts) + "\n"


# --- the README itself, without a cluster ------------------------------------------------------


def test_marker_parsing_sees_indented_blocks_and_reasons() -> None:
    sample = (
        "text\n\n<!-- readme-test: skip: it serves forever -->\n```sh\nmake up\n```\n"
        "- item\n\n  ```sh\n  curl x \\\n    y\n  ```\n```python\nprint()\n```\n"
    )
    blocks = fenced_blocks(sample)
    assert [(b.lang, b.skip) for b in blocks] == [
        ("sh", "it serves forever"),
        ("sh", None),
        ("python", None),
    ]
    assert blocks[1].text == "curl x \\\n  y\n"
    with pytest.raises(ValueError, match="not right before a block"):
        fenced_blocks("<!-- readme-test: skip: why -->\nprose\n```sh\nls\n```\n")
    with pytest.raises(ValueError, match="unknown readme-test marker"):
        fenced_blocks("<!-- readme-test: run -->\n```sh\nls\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        fenced_blocks("```sh\nls\n")


def test_every_block_names_a_known_language() -> None:
    """A block without a language (or with an unusual one) could hide a command from the test."""
    for block in fenced_blocks(README.read_text()):
        assert block.lang in SHELL_LANGUAGES | OTHER_LANGUAGES, f"README.md line {block.line}"


def test_skipped_blocks_say_why_and_set_only_what_the_test_sets() -> None:
    blocks = shell_blocks(README.read_text())
    assert [b for b in blocks if b.skip is None], "no runnable shell block found"
    for block in blocks:
        if block.skip is None:
            continue
        assert len(block.skip) >= 10, f"README.md line {block.line}: say why it is skipped"
        exported = set(_EXPORT.findall(block.text))
        assert exported <= PROVIDED_VARIABLES, (
            f"README.md line {block.line} tells the reader to set {exported - PROVIDED_VARIABLES}, "
            "which this test does not provide"
        )


# --- the README against a running cluster -------------------------------------------------------


def _workdir(tmp: Path) -> Path:
    """A directory whose ``.venv/bin/vajra`` and ``.venv/bin/python`` are this interpreter's."""
    work = tmp / "work"
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = shlex.quote(sys.executable)
    entry = Path(sys.executable).parent / "vajra"  # the installed console script
    commands = {
        "vajra": f'exec {shlex.quote(str(entry))} "$@"'
        if entry.is_file()
        else f'exec {python} -m vajra "$@"',
        "python": f'exec {python} "$@"',
    }
    for name, command in commands.items():
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(0o755)
    return work


def _run_blocks(blocks: list[Block], work: Path, env: dict[str, str], log: Path) -> int | None:
    """Run the blocks' script in ``work``; its exit code, or None when it ran out of time."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", blocks_script(blocks)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=BLOCKS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _failure_report(blocks: list[Block], output: str, code: int | None) -> str:
    started = [int(n) for n in re.findall(r"^### readme block (\d+) \(", output, re.MULTILINE)]
    failed = blocks[started[-1]] if started else blocks[0]
    how = "ran out of time" if code is None else f"exited {code}"
    return (
        f"the README block at line {failed.line} {how}:\n{failed.text}\n"
        f"--- output ---\n{output[-6000:]}"
    )


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_readme_shell_blocks_run_against_a_cluster(tmp_path: Path, tiny_model_dir: Path) -> None:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and curl")
    blocks = [b for b in shell_blocks(README.read_text()) if b.skip is None]
    home = tmp_path / "home"
    model = home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    admin_key = "readme-" + secrets.token_hex(16)
    env = {**vajra_env(home), ADMIN_KEY_ENV: admin_key}
    log_path = tmp_path / "cluster.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vajra", "up", "--gateway-port", "0", "--http-port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ready = False
    try:
        info = wait_ready(proc, home, log_path, timeout=READY_TIMEOUT_S)
        ready = True
        cluster = RunningCluster(home, model, proc, info, log_path)
        # What the README says of `vajra up`: the tiny model's home, the admin key's.
        assert info["model"] == str(model)
        assert f"vajra: admin key: ${ADMIN_KEY_ENV}" in cluster.log()
        blocks_env = {**env, "ADMIN": admin_key, "VAJRA_URL": str(info["http_address"])}
        output_path = tmp_path / "blocks.log"
        code = _run_blocks(blocks, _workdir(tmp_path), blocks_env, output_path)
        output = output_path.read_text(errors="replace")
        assert code == 0, _failure_report(blocks, output, code)
        assert f"### readme block {len(blocks) - 1} ok" in output
        assert admin_key not in cluster.full_log()
    finally:
        if ready and proc.poll() is None:
            stop_cluster(RunningCluster(home, model, proc, {}, log_path))
        elif proc.poll() is None:  # it never got ready: its actors exit with it (lifeline)
            proc.kill()
            proc.wait(timeout=30)
        leftovers, _ = wait_gone(cluster_pids(home), timeout=10.0)
        assert not leftovers, f"processes left running: {leftovers}"
