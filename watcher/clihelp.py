"""What the command line's parser gets besides its commands: an example per subcommand in its ``--help``, the
global options accepted after the subcommand as well as before it, and shell completion.

Completion is argcomplete's, for bash, zsh and fish from this one parser (shtab writes static scripts, but has
no fish): the shell runs ``watcher`` with ``_ARGCOMPLETE`` set, and :func:`complete` answers before any command
runs. ``watcher completion SHELL`` prints the script to install.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

GLOBAL_OPTIONS = ("--config", "--log-format", "--log-level")
SHELLS = ("bash", "zsh", "fish")

# Each line must parse as written (tests/test_clihelp.py parses them); text after " #" is a comment, after " |" or
# " >" shell plumbing.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "run": (
        "watcher run ~/Music/Inbox  # watch one folder with the defaults",
        "watcher run --config /etc/watcher/config.toml --log-format json",
    ),
    "scan": (
        "watcher scan ~/Music/Inbox/album  # process what is there now, then exit",
        "watcher scan --dry-run ~/Music/Inbox  # what it would cost, sending nothing",
    ),
    "status": ("watcher status", "watcher status --json --config ~/watcher.toml | jq .spend"),
    "retry": ("watcher retry --failed", "watcher retry ~/Music/Inbox/take.wav"),
    "doctor": ("watcher doctor", "watcher doctor /mnt/nas/inbox  # check a folder before adding it"),
    "pause": ("watcher pause /mnt/nas/inbox",),
    "resume": ("watcher resume /mnt/nas/inbox",),
    "adopt": ("watcher adopt /mnt/nas/inbox  # this store takes the folder over",),
    "store": (
        "watcher store backup ~/watcher-store.db  # a consistent copy, while the daemon runs",
        "watcher store restore ~/watcher-store.db  # with the daemon stopped",
        "watcher store migrate --to postgresql://watcher@db:5432/watcher  # to several machines (daemon stopped)",
    ),
    "web": ("watcher web  # the running daemon's page and a new one-time login link to it",),
    "backfill": (
        "watcher backfill  # what a config change added for files already processed, and its price",
        "watcher backfill --yes  # queue it",
    ),
    "spend": ("watcher spend --from 2026-12-01 --to 2026-12-31 --csv > december.csv",),
    "emulate": ("watcher emulate --port 9000 --analysis-key test-key  # both services, for a demo",),
    "completion": (
        'eval "$(watcher completion bash)"  # in ~/.bashrc',
        'eval "$(watcher completion zsh)"  # in ~/.zshrc',
        "watcher completion fish > ~/.config/fish/completions/watcher.fish",
    ),
}


def add_completion_command(sub: Any) -> None:
    """``watcher completion SHELL``: print the shell's completion script."""
    completion = sub.add_parser("completion", help="print the shell completion script for bash, zsh or fish")
    completion.add_argument("shell", choices=SHELLS)


def finish(parser: argparse.ArgumentParser, sub: Any) -> None:
    """Once every subcommand is added: examples into each one's help, the global options onto each one."""
    shared = [a for a in parser._actions if set(a.option_strings) & set(GLOBAL_OPTIONS)]
    for name, command in sub.choices.items():
        examples = EXAMPLES.get(name)
        if examples:
            command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
            command.formatter_class = argparse.RawDescriptionHelpFormatter
        group = command.add_argument_group("global options (also accepted before the command)")
        for action in shared:
            # SUPPRESS: given here it overrides; not given, the value from before the command (or its default) stays.
            group.add_argument(
                *action.option_strings,
                dest=action.dest,
                type=action.type,
                choices=action.choices,
                help=action.help,
                metavar=action.metavar,
                default=argparse.SUPPRESS,
            )


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request (and exit) when the shell asked for one; else return at once."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def completion_script(shell: str) -> str:
    """The script that makes ``shell`` complete ``watcher`` (argcomplete's, for this one command)."""
    import argcomplete

    return str(argcomplete.shellcode(["watcher"], shell=shell))
