"""`bigpipe completion bash`: the script completes commands, sub-commands, options and
config files in a real bash, from the parsers the commands parse with."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    made = subprocess.run(
        [sys.executable, "-m", "bigpipe", "completion", "bash"],
        capture_output=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    path = tmp_path_factory.mktemp("completion") / "bigpipe.bash"
    path.write_bytes(made.stdout)
    return path


def complete(script: Path, words: list[str], cwd: Path = REPO) -> list[str]:
    """What bash offers for the last of `words`, as if TAB was pressed after it."""
    program = (
        f"source {shlex.quote(str(script))}; COMP_WORDS=({shlex.join(words)}); "
        f"COMP_CWORD={len(words) - 1}; _shtab_bigpipe; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    done = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, check=True, cwd=cwd, timeout=30
    )
    return done.stdout.split()


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (["bigpipe", "dl"], ["dlq"]),
        (["bigpipe", "dlq", "re"], ["redrive"]),
        (["bigpipe", "dlq", "redrive", "--dr"], ["--dry-run"]),
        (["bigpipe", "--wo"], ["--workers"]),
        (["bigpipe", "status", "--js"], ["--json"]),
        (["bigpipe", "completion", "z"], ["zsh"]),
    ],
)
def test_bash_completes_commands_and_options(
    script: Path, words: list[str], offered: list[str]
) -> None:
    assert complete(script, words) == offered


def test_bash_completes_config_files(script: Path) -> None:
    assert complete(script, ["bigpipe", "-config", "config/bigpipe.j"]) == ["config/bigpipe.json"]
    assert "config/bigpipe.json" in complete(
        script, ["bigpipe", "dlq", "list", "--config", "config/bigpipe.j"]
    )


def test_an_unknown_shell_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bigpipe", "completion", "fish"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice: 'fish'" in done.stderr
