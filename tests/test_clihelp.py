"""The command line's help, global options after the command, and shell completion, as a user meets them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from watcher import cli, clihelp

pytestmark = pytest.mark.timeout(60)


def subcommands() -> dict[str, object]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_every_subcommand_help_shows_examples() -> None:
    """Each subcommand's --help ends with examples of that very subcommand."""
    for name, command in subcommands().items():
        text = command.format_help()  # type: ignore[attr-defined]
        assert "examples:\n" in text, name
        examples = text.split("examples:\n", 1)[1]
        assert f"watcher {name}" in examples or name == "completion", name


def test_every_example_parses_as_written() -> None:
    """Every example line, shell plumbing and comments left out, is accepted by the parser."""
    parser = cli.build_parser()
    for name, lines in clihelp.EXAMPLES.items():
        assert name in subcommands(), f"an example for a command that does not exist: {name}"
        for line in lines:
            command = line.split(" #")[0].split(" |")[0].split(" >")[0]
            if "$(" in command:  # eval "$(watcher ...)"
                command = command.split("$(", 1)[1].split(")", 1)[0]
            words = shlex.split(command)
            assert words[0] == "watcher", line
            args = parser.parse_args(words[1:])
            assert args.command == name, line


def test_global_options_are_accepted_after_the_command(tmp_path: Path) -> None:
    """`watcher status --config X` means the same as `watcher --config X status`; after the command wins."""
    parser = cli.build_parser()
    after = parser.parse_args(["status", "--config", "x.toml", "--log-level", "debug", "--log-format", "json"])
    before = parser.parse_args(["--config", "x.toml", "--log-level", "debug", "--log-format", "json", "status"])
    assert vars(after) == vars(before)
    assert after.config == Path("x.toml") and after.log_level == "debug" and after.log_format == "json"
    plain = parser.parse_args(["status"])
    assert (plain.config, plain.log_level, plain.log_format) == (None, None, "auto")
    both = parser.parse_args(["--config", "a.toml", "scan", "--config", "b.toml", "p"])
    assert both.config == Path("b.toml")
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--log-format", "xml"])


def test_status_reads_the_config_given_after_the_command(tmp_path: Path) -> None:
    """A real `watcher status --config FILE` reads that file: it names the file's own state folder."""
    config = tmp_path / "c.toml"
    state = tmp_path / "state-from-the-file"
    config.write_text(f'state_dir = "{state}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    proc = subprocess.run([sys.executable, "-m", "watcher", "status", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert "unrecognized arguments" not in proc.stderr
    assert f"watcher has not run with state_dir = {state}" in proc.stderr, proc.stderr


def complete(line: str, tmp_path: Path) -> list[str]:
    """What the shell gets offered for ``line`` (cursor at its end), through argcomplete's own protocol."""
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "COMP_TYPE": "9"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "watcher"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [w.strip() for w in out.read_text().split("\n") if w.strip()]


def test_completion_offers_commands_options_and_choices(tmp_path: Path) -> None:
    """TAB offers the subcommands, a subcommand's options (globals included) and an option's choices."""
    assert {"status", "scan", "run", "completion"} <= set(complete("watcher ", tmp_path))
    assert set(complete("watcher sta", tmp_path)) == {"status"}
    assert {"--json", "--all", "--config", "--log-level"} <= set(complete("watcher status --", tmp_path))
    assert set(complete("watcher status --log-format ", tmp_path)) == {"auto", "console", "json"}


@pytest.mark.parametrize("shell", clihelp.SHELLS)
def test_completion_script_for_each_shell(shell: str) -> None:
    """`watcher completion SHELL` prints a script naming watcher; bash (and zsh, fish when installed) parse it."""
    proc = subprocess.run([sys.executable, "-m", "watcher", "completion", shell], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "watcher" in proc.stdout and "_ARGCOMPLETE" in proc.stdout
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed: the script's syntax is not checked")
    check = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}[shell]
    syntax = subprocess.run([*check], input=proc.stdout, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
