"""`xentap`'s lazy command table names each command once, by the name the
command itself has, and misses none of the VBD commands."""
from __future__ import annotations

import importlib

import click

from xentap import cli_vbd
from xentap.cli import cli


def test_every_lazy_entry_is_the_command_of_that_name():
    for name, (module, attr) in cli.lazy.items():
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command), name
        assert cmd.name == name, (name, module, attr)


def test_every_vbd_command_is_in_the_table():
    assert {c.name for c in cli_vbd.COMMANDS} <= set(cli.lazy)
    assert set(cli_vbd.cli.commands) <= set(cli.lazy)
