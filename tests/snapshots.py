"""What a test root holds, as a comparable snapshot: the served-deployment security tests' witness.

`tree_snapshot(tops, skip)` maps every entry below `tops` (symlinks not
followed) to `("link", target)`, `("dir", mode[, mtime])` or
`("file", size, mtime, sha1)`; `changed(before, after)` lists the keys added,
removed or changed, so a test can say which path a run touched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional


def sha1(path: os.PathLike | str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_snapshot(
    tops: Iterable[Path],
    skip: Iterable[Path] = (),
    *,
    dir_mtimes: bool = True,
    ignore: Optional[Callable[[Path], bool]] = None,
) -> dict[str, tuple]:
    """Every entry below `tops` but those in `skip` (and below them) or that `ignore` picks.

    `dir_mtimes=False` leaves directories' mtimes out: an entry added in a
    directory then shows as that entry alone.
    """
    skipped = set(skip)
    entries: dict[str, tuple] = {}
    for top in tops:
        for current, dirs, files in os.walk(top, followlinks=False):
            dirs[:] = [d for d in dirs if Path(current, d) not in skipped]
            for name in dirs + files:
                path = Path(current, name)
                if path in skipped or (ignore is not None and ignore(path)):
                    continue
                stat = path.lstat()
                if path.is_symlink():
                    entries[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    entries[str(path)] = ("dir", stat.st_mode, stat.st_mtime_ns) if dir_mtimes else ("dir", stat.st_mode)
                else:
                    entries[str(path)] = ("file", stat.st_size, stat.st_mtime_ns, sha1(path))
    return entries


def changed(before: dict, after: dict) -> list[str]:
    """The keys added, removed or changed between two snapshots, sorted."""
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
