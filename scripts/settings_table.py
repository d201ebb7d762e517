"""Print (or, with --write, refresh in README.md) the settings table from common/settings.py.

The README's table sits between the markers below; `make docs` rewrites it, and a test fails
when the README and the code disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.settings import documented_settings

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, doc in documented_settings():
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        escaped_doc = doc.replace("|", "\\|")
        rows.append(f"| `{env}` | {shown} | {escaped_doc} |")
    return "\n".join(rows)


def refreshed(readme_text: str) -> str:
    head, _, rest = readme_text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(refreshed(README.read_text()))
    else:
        print(table())
