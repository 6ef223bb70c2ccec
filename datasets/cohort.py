"""``--max-per-class CLASS=N``: draw a class's cohort at random, once, and keep the draw.

The paper used 259 of the ~580 IXI subjects as Healthy. Taking every file found changes the class
balance (and the weighted loss, and macro F1's meaning) relative to the paper's table, so a run can
draw N subjects of a class with its seed, before splitting. The drawn list is saved with the run
(``OUT/cohort.json``) and reused on resume, so adding files to the data folder later cannot change
which subjects a resumed run trains on.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from datasets.atomic import write_text_atomic
from datasets.records import SubjectRecord


def parse_max_per_class(items: Sequence[str]) -> dict[str, int]:
    """``["Healthy=259", "HGG=100"]`` -> ``{"Healthy": 259, "HGG": 100}``, with messages that name the option."""
    caps: dict[str, int] = {}
    for item in items:
        name, sep, text = str(item).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--max-per-class expects CLASS=N (e.g. Healthy=259), got {item!r}")
        caps[name.strip()] = _count(name.strip(), text.strip())
    return caps


def _count(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--max-per-class {name}={value}: N must be a whole number of subjects") from None
    if isinstance(value, float) and not float(value).is_integer() or isinstance(value, bool) or number < 1:
        raise ValueError(f"--max-per-class {name}={value}: N must be a whole number of subjects, at least 1")
    return number


def check_max_per_class(caps: Mapping[str, Any]) -> dict[str, int]:
    """Caps as plain data (from the CLI or a saved experiment.json), validated before any file is read."""
    return {str(name): _count(str(name), value) for name, value in dict(caps).items()}


def draw_cohort(records: Sequence[SubjectRecord], caps: Mapping[str, int], seed: int, classes: Sequence[str],
                saved: str | os.PathLike | None = None) -> tuple[list[SubjectRecord], dict[str, Any]]:
    """Keep at most ``caps[c]`` subjects of class c, drawn with ``seed``; reuse ``saved`` when it exists.

    Returns the kept records (input order) and what to record with the run: available and drawn
    counts per class and the drawn ids. Nothing is written: the caller saves the draw with
    :func:`save_cohort` once the run's other checks have passed.
    """
    unknown = sorted(set(caps) - set(classes))
    if unknown:
        raise ValueError(f"--max-per-class names class(es) {', '.join(unknown)} that the data does not have; "
                         f"classes are {', '.join(classes)}")
    available = {c: sorted(r.subject_id for r in records if r.label == c) for c in classes}
    saved_path = Path(saved) if saved is not None else None
    reused = saved_path is not None and saved_path.is_file()
    drawn = _load(saved_path, available, caps, seed) if reused else _draw(available, caps, seed)
    keep = {sid for ids in drawn.values() for sid in ids}
    kept = [r for r in records if r.label not in caps or r.subject_id in keep]
    info = {"seed": int(seed), "max_per_class": dict(caps), "available": {c: len(ids) for c, ids in available.items()},
            "drawn": {c: sum(1 for r in kept if r.label == c) for c in classes}, "reused": reused, "subjects": drawn}
    return kept, info


def save_cohort(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write the draw once (nothing to write without caps); a resumed run reads it back in ``draw_cohort``."""
    if info["max_per_class"] and not info["reused"]:
        write_text_atomic(path, json.dumps({k: info[k] for k in ("seed", "max_per_class", "available", "subjects")},
                                           indent=2, sort_keys=True))


def _draw(available: dict[str, list[str]], caps: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    drawn = {}
    for cls in sorted(caps):
        ids = available[cls]
        # One generator per class, seeded with its name (not its rank among the capped classes): a cap added on
        # another class never changes this class's draw.
        rng = np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8"))])
        chosen = ids if len(ids) <= caps[cls] else list(rng.choice(ids, size=caps[cls], replace=False))
        drawn[cls] = sorted(str(s) for s in chosen)
    return drawn


def _load(path: Path, available: dict[str, list[str]], caps: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    record = json.loads(path.read_text())
    if dict(record.get("max_per_class", {})) != dict(caps):
        raise ValueError(f"{path} was drawn with --max-per-class {record.get('max_per_class')}, not {dict(caps)}; "
                         "use another --output, or delete the file to draw again")
    if record.get("seed") != int(seed):
        raise ValueError(f"{path} was drawn with --seed {record.get('seed')}, not {seed}; use another --output, or "
                         "delete the file to draw again")
    drawn = {c: list(ids) for c, ids in record["subjects"].items()}
    for cls, ids in drawn.items():
        gone = sorted(set(ids) - set(available.get(cls, [])))
        if gone:
            raise ValueError(f"{path} names {cls} subject(s) that are no longer valid in the data "
                             f"({', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}); restore them, or delete "
                             f"{path.name} to draw the cohort again")
    return drawn
