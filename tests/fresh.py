"""Test helper: run a few lines of Python in a fresh interpreter (imports not yet paid)."""

from __future__ import annotations

import subprocess
import sys


def in_fresh_python(*lines: str) -> None:
    """Run ``lines`` in a new ``python -c``; fail with its stderr if it does not exit 0."""
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
