"""Rich consoles that stay readable when piped: a log file or a bug report gets 160 columns rather than
rich's 80 (which cut table columns and the time columns of progress frames), unless COLUMNS says otherwise.
Torch-free, so the CLI can build its console at import."""

from __future__ import annotations

import os
import sys

from rich.console import Console

PIPED_WIDTH = 160


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH if piped else None)
