#!/usr/bin/env python3
"""Django's command-line utility for chatui.

Any Python 3.11 can run it: on first use it makes `.venv` beside this file, installs
the project there, and runs itself again inside it. That is what lets the README's two
commands (`python3 manage.py up`, `python3 manage.py test`) work on a machine that has
nothing but Python and pip. A change to pyproject.toml reinstalls on the next run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def ensure_virtualenv() -> None:
    """Re-run this command inside the project's virtualenv, creating it if needed."""
    if os.environ.get("CHATUI_NO_VENV") or Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    # The test command also needs the test extras (pytest, Playwright, ruff).
    extras = "test" if sys.argv[1:2] == ["test"] else ""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".installed-{extras or 'base'}"
    if not python.exists():
        print(f"Creating the virtualenv in {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        target = f"{ROOT}[{extras}]" if extras else str(ROOT)
        print("Installing chatui and its dependencies ...", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", target], check=True)
        stamp.write_text(wanted)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main() -> None:
    ensure_virtualenv()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatui.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
