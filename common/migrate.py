"""Apply one service's migrations: `python -m common.migrate <service>/migrations`, the URL on stdin.

Services run this in a child process at start (`common.db.migrate`), so that alembic and mako
(about 11 MB of RSS) never load into the process that serves. The URL comes on stdin, not on
the command line, so a database password never shows in `ps`. Log lines go to stderr in the
service's format; the exit status says whether the migrations were applied.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.logs import configure_logging
from common.settings import Settings


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m common.migrate <migrations dir>  (the database URL on stdin)", file=sys.stderr)
        return 2
    migrations_dir = Path(argv[0])
    settings = Settings.load()
    configure_logging(migrations_dir.resolve().parent.name, settings.log_level, settings.log_format)
    from common.db import migrate_sync  # after logging is set up: alembic logs as it imports

    migrate_sync(migrations_dir, sys.stdin.read().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
