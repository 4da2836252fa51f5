"""cadnode: a DICOM node that reads screening mammograms with a vision-language model and sends
its findings back as DICOM objects.

Settings come from a TOML file (--config, else ./cadnode.toml) and CADNODE_* environment
variables (which win); every subcommand takes --config and --log-level.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from cadnode import __version__
from cadnode.cli import db, demo, engine, jobs, ops, send, serve, study
from cadnode.config import Settings, SettingsError, load_settings

#: The command modules; each adds its subcommands (``register``) with a ``func`` to run.
COMMAND_MODULES = (serve, jobs, study, send, ops, db, demo, engine)


def common_options() -> argparse.ArgumentParser:
    """--config and --log-level, accepted before or after any subcommand (SUPPRESS: an option
    given before the subcommand is not overwritten by the subcommand's absent default)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="TOML settings file (default: ./cadnode.toml if present)")
    p.add_argument("--log-level", default=argparse.SUPPRESS,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="overrides CADNODE_LOG_LEVEL for this command")
    return p


def settings_epilog() -> str:
    """The settings, as environment variables (TOML keys are the same names in lower case)."""
    names = [f"CADNODE_{f.name.upper()}" for f in fields(Settings)]
    lines, line = [], " "
    for name in names:
        if len(line) + len(name) > 76:
            lines.append(line)
            line = " "
        line += f" {name}"
    lines.append(line)
    return ("settings (environment, or the same name in lower case without CADNODE_ in "
            "the TOML file):\n" + "\n".join(lines) + "\nsee README.md, 'Settings'.")


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(prog="cadnode", description=__doc__, parents=[common],
                                epilog=settings_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cadnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cadnode.dicom.sender import configure_pynetdicom

    configure_pynetdicom()  # the one place process-wide library settings are made
    try:
        settings = load_settings(getattr(args, "config", None))
        if getattr(args, "log_level", None):
            from dataclasses import replace

            settings = replace(settings, log_level=args.log_level)
        if not getattr(args, "node_process", False):  # node processes set up their own
            from cadnode.cli.common import setup_logging

            # an admin command prints what it did (pynetdicom's own errors included, in its
            # words); its log, and the libraries', say more only when asked
            asked = getattr(args, "log_level", None)
            setup_logging(settings, to_file=False, level=asked or "WARNING",
                          libraries=logging.WARNING if asked else logging.CRITICAL,
                          warn_unknown=False)
        result: int = args.func(settings, args)
        return result
    except SettingsError as exc:
        print(f"cadnode: bad setting: {exc}", file=sys.stderr)
        return 2
