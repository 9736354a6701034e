"""The offline catalog: real released config.json files, each with where it came from.

There is no model hub at run time, so paramcalc ships the configs users ask about
most (``paramcalc/catalog/<name>.json``). A name resolves with or without its hub
organisation (``bert-base-uncased`` or ``google-bert/bert-base-uncased``).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

CATALOG_DIR = Path(__file__).with_name("catalog")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hub_id: str
    source: str
    config: dict
    published_params: int | None = None
    published_params_source: str | None = None

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")


@functools.cache
def entries() -> dict[str, CatalogEntry]:
    found = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        found[raw["name"]] = CatalogEntry(
            name=raw["name"], hub_id=raw["hub_id"], source=raw["source"], config=raw["config"],
            published_params=raw.get("published_params"),
            published_params_source=raw.get("published_params_source"),
        )
    return found


@functools.cache
def _index() -> dict[str, CatalogEntry]:
    index = {}
    for entry in entries().values():
        for key in (entry.name, entry.hub_id, entry.hub_id.split("/")[-1]):
            index[key.lower()] = entry
    return index


def lookup(name: str) -> CatalogEntry | None:
    return _index().get(name.lower())


def suggestions(name: str, n: int = 3) -> list[str]:
    """Close catalog names for an unknown one ("did you mean ...")."""
    bare = name.lower().split("/")[-1]
    names = sorted(entries())
    close = difflib.get_close_matches(bare, names, n=n, cutoff=0.5)
    return close or [n_ for n_ in names if bare[:3] and n_.startswith(bare[:3])][:n]
