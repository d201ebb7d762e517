"""`python -m bench [--quick] [--out PATH] [--profile] [--phases ...] [--sessions N,...]`: run, print, write RESULTS.md."""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
from pathlib import Path

from bench.run import PHASES, Options, run

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


def raise_open_file_limit() -> None:
    """Thousands of sessions need thousands of sockets in every process; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 65536
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute (CI smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the markdown")
    parser.add_argument("--profile", action="store_true", help="also py-spy the services under 16 chatting users")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)} (default: all)"
    )
    parser.add_argument("--sessions", default="", help="comma-separated session counts, e.g. 1000,5000")
    parser.add_argument("--ramp", type=float, default=0.0, help="start the sessions over this many seconds (0: burst)")
    args = parser.parse_args(argv)
    phases = tuple(phase for phase in args.phases.split(",") if phase)
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    sessions = tuple(int(count) for count in args.sessions.split(",") if count)
    raise_open_file_limit()
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    options = Options(args.quick, args.out, command.strip(), args.profile, phases, sessions, args.ramp)
    print(run(options))


if __name__ == "__main__":
    main()
