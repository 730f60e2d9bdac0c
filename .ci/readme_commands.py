"""Prints the command of the README.md block marked ``<!-- ci:NAME -->`` (``demo`` or ``tests``).

.ci/run runs the README's two commands exactly as a reader types them, taken from the README itself,
so the two cannot drift apart. A marked block is a fenced ``bash`` block of exactly one command line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^<!-- ci:(\w+) -->\n```bash\n(.*?)^```$", re.M | re.S)


def readme_commands(text: str) -> dict[str, str]:
    """{name: command} of every marked block; a name marked twice or a block not of one line is an error."""
    found: dict[str, str] = {}
    for name, body in BLOCK.findall(text):
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"README block ci:{name} must hold exactly one command line, found {len(lines)}")
        if name in found:
            raise ValueError(f"README marks ci:{name} twice")
        found[name] = lines[0].strip()
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: readme_commands.py NAME", file=sys.stderr)
        return 2
    commands = readme_commands(README.read_text(encoding="utf-8"))
    if argv[0] not in commands:
        print(f"{README}: no block marked <!-- ci:{argv[0]} --> (found: {sorted(commands)})", file=sys.stderr)
        return 1
    print(commands[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
