"""The admin CLI: `shapstack`. Commands are thin: parse flags, build settings, call a stage, print.

The root group and the error policy are in shapstack.group; the commands live in the cmd_*
modules, one per area, each registering on the root group when imported here.
"""

from __future__ import annotations

from shapstack import cmd_data, cmd_db, cmd_models, cmd_ops, cmd_serve  # noqa: F401 - they register commands
from shapstack.group import cli


def main() -> None:
    cli(prog_name="shapstack")
