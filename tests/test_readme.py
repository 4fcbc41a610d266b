"""README.md against the code: the usage block is --help's, every option is described, every
generated example is what a real run prints today (tools/readme_examples.py)."""

from __future__ import annotations

import re

import readme_examples
from conftest import ROOT

from tfl_fuse import cli

README = (ROOT / "README.md").read_text()


def test_usage_block_is_the_help_usage():
    block = re.search(r"<!-- generated: usage -->\n```\n(.*?)```\n", README, re.S)
    assert block, "README.md has no generated usage block"
    assert block.group(1) == readme_examples.usage_text()
    assert "--version" in block.group(1) and "--target" in block.group(1)


def test_every_option_is_in_the_options_table():
    table = README[README.index("| option | meaning |") :]
    table = table[: table.index("\n\n")]
    described = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", table))
    for action in cli.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert set(action.option_strings) & described, action.option_strings


def test_exit_codes_are_documented():
    table = README[README.index("### Exit codes") :]
    for code in (cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_MISMATCH, cli.EXIT_CHANGES):
        assert f"\n| {code} |" in table
        assert f"{code} " in cli.EPILOG


def test_generated_examples_are_current(capsys):
    assert readme_examples.main(["--check"]) == 0, capsys.readouterr().err
