"""The ``iex`` command line loads only the module of the command it runs: its table of
commands says what every module registers, and ``iex --help`` lists them without importing
any of them."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from app.cli import COMMANDS, build_parser


def _registered(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Each command of a parser and its help, in order."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in commands._choices_actions}


def test_the_table_names_every_command_its_module_registers_with_its_help() -> None:
    every = build_parser(every=True)
    assert _registered(every) == {name: text for name, (_, text) in COMMANDS.items()}
    assert build_parser([]).format_help() == every.format_help()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_is_parsed_by_its_own_module(command: str) -> None:
    parser = build_parser([command, "--help"])
    registered = _registered(parser)
    assert command in registered
    # Only what its module registers: the others were not imported for it.
    assert set(registered) == {n for n, (m, _) in COMMANDS.items() if m == COMMANDS[command][0]}


def test_the_general_help_imports_no_command_module() -> None:
    probe = (
        "import sys, contextlib, io\n"
        "from app.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('app.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "['app.cli']"


def test_an_unknown_command_is_refused_naming_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "sned"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid choice: 'sned'" in result.stderr and "'send'" in result.stderr
