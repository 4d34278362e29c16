"""Fold py-spy's raw stacks into call sites of the trainer's own code: where a training step spends its time.

`py-spy record -f raw` writes one line per distinct stack, "frame;frame;...;frame COUNT", outermost frame
first, each frame "function (file:line)". A sample is charged to the innermost frame that lies in one of
the given source files (the trainer's own loop: for us dschat/trainers/ppo.py and rollout.py, for TRL its
ppo_trainer.py), so "generate_experience (dschat/trainers/ppo.py:108)" is everything under that line: the
actor forward it calls, with all of torch and DeepSpeed below it. Samples outside those files are charged
to "(other)". Seconds = samples / sampling rate (py-spy samples every thread that is not idle).

    python bench/profile_fold.py PROFILE.txt --rate 25 --files dschat/trainers/ppo.py dschat/trainers/rollout.py
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """(frames outermost first, count) per line of py-spy's raw format; lines without a count are skipped."""
    stacks = []
    for line in text.splitlines():
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            stacks.append((head.split(";"), int(count)))
    return stacks


def charge_site(frames: list[str], files: tuple[str, ...]) -> str:
    """The innermost frame "function (file:line)" whose file ends with one of `files`, else "(other)"."""
    for frame in reversed(frames):
        m = _FRAME.match(frame.strip())
        if m and m.group("file").endswith(files):
            return f"{m.group('func')} ({Path(m.group('file')).name}:{m.group('line')})"
    return "(other)"


def fold(text: str, files: tuple[str, ...]) -> Counter:
    """Samples per call site (see charge_site) over every stack of a raw py-spy profile."""
    sites: Counter = Counter()
    for frames, count in parse_raw(text):
        sites[charge_site(frames, files)] += count
    return sites


def table(sites: Counter, rate: float, top: int = 15) -> list[dict[str, float | str]]:
    """The `top` call sites with samples, seconds and share of all samples."""
    total = sum(sites.values()) or 1
    return [{"site": site, "samples": n, "s": n / rate, "share": n / total} for site, n in sites.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="py-spy record -f raw output")
    p.add_argument("--rate", type=float, required=True, help="py-spy's --rate (samples per second)")
    p.add_argument("--files", nargs="+", required=True, help="source files whose lines are the call sites")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    for row in table(fold(Path(args.profile).read_text(), tuple(args.files)), args.rate, args.top):
        print(f"{row['s']:8.1f} s {row['share']:6.1%}  {row['site']}")


if __name__ == "__main__":
    main()
