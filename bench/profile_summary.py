"""Summaries of py-spy's raw (collapsed) profiles: where a service's CPU samples land.

`python -m bench.profile_summary FILE...` prints, per file, the share of samples by package
of the innermost frame (self time) and the top functions inclusive of what they call.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


# Frames every sample passes through (interpreter start, the event loop): no information.
_GENERIC = (
    "<module>",
    "_run_module_as_main",
    "_run_code",
    "main (common)",
    "run (stdlib:asyncio",
    "Runner.run",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop.run_forever",
    "BaseEventLoop._run_once",
    "Handle._run",
    "Thread._bootstrap",
    "Thread.run",
)


def package_of(path: str) -> str:
    """site-packages/<pkg>/..., the stdlib module, or our own top-level package."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/work/" in path or not path.startswith("/"):
        parts = [part for part in Path(path).parts if part not in ("/",)]
        for known in ("common", "task_service", "conversation_service", "agent_service", "todo", "gateway"):
            if known in parts:
                return known
    if "/lib/python3" in path:
        module = path.split("/lib/python3", 1)[1].split("/", 2)
        return "stdlib:" + (module[1].removesuffix(".py") if len(module) > 1 else "?")
    return Path(path).name


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def _split(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    return (match["function"], match["file"]) if match else (frame, "")


def summarize(path: Path, top: int = 12) -> str:
    stacks = parse(path)
    total = sum(count for _, count in stacks) or 1
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        _function, file = _split(frames[-1])
        by_package[package_of(file)] += count
        seen = set()
        for frame in frames:
            function, file = _split(frame)
            key = f"{function} ({package_of(file)})"
            if key not in seen:  # recursion counts once
                seen.add(key)
                inclusive[key] += count
    lines = [f"### {path.stem} ({total} samples)", "", "self time by package:", ""]
    lines += [f"- {name}: {count * 100 / total:.1f}%" for name, count in by_package.most_common(top)]
    lines += ["", "inclusive time by function (the event loop's own frames left out):", ""]
    shown = [(name, count) for name, count in inclusive.most_common() if not name.startswith(_GENERIC)]
    lines += [f"- {name}: {count * 100 / total:.1f}%" for name, count in shown[: top * 2]]
    return "\n".join(lines)


def main() -> None:
    for name in sys.argv[1:]:
        print(summarize(Path(name)))
        print()


if __name__ == "__main__":
    main()
