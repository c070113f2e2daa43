"""Chain heads kept outside the database, so that whoever can write the database cannot rewrite history
and leave a clean audit.

The hash chains make every edit of an entry visible, but someone with write access to the database can
recompute them, or erase the newest transactions and roll the heads back. So every few minutes each
ledger's chain heads (account -> seq, hash) are written to files in a directory outside the database
(`<SVC>_LEDGER_ANCHOR_DIR`; in production a write-once bucket or another host's volume), and the audit
checks that the entries the newest anchor names are still there with those hashes: a chain that
passes through them was not rewritten before them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

Heads = dict[str, tuple[int, str]]
"""account id -> (seq, hash) of its newest entry."""


@dataclass(frozen=True)
class Anchor:
    written_at: dt.datetime
    heads: Heads


class AnchorStore:
    """Anchors as one JSON file each in `directory`, newest kept, `keep` of them."""

    def __init__(self, directory: Path, *, keep: int = 48) -> None:
        self._dir = directory
        self._keep = keep

    def write(self, heads: Mapping[str, tuple[int, str]], at: dt.datetime) -> Path:
        """Write an anchor atomically (a reader never sees half of one) and drop the oldest."""
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"anchor-{at.strftime('%Y%m%dT%H%M%S%fZ')}.json"
        temporary = path.with_suffix(".tmp")
        body = {"written_at": at.isoformat(), "heads": {a: list(h) for a, h in heads.items()}}
        temporary.write_text(json.dumps(body, sort_keys=True))
        os.replace(temporary, path)
        for old in self._files()[: -self._keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Anchor | None:
        files = self._files()
        if not files:
            return None
        body = json.loads(files[-1].read_text())
        return Anchor(
            dt.datetime.fromisoformat(body["written_at"]),
            {account: (int(seq), str(h)) for account, (seq, h) in body["heads"].items()},
        )

    def _files(self) -> list[Path]:
        return sorted(self._dir.glob("anchor-*.json")) if self._dir.exists() else []
