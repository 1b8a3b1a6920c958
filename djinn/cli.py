"""What djinn's command lines share: help that shows each option's default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default but None and "": those options say in words what they fall back to,
    and a default read from the environment (a token) never reaches the screen. The
    description and epilog keep their line breaks (usage examples)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)
