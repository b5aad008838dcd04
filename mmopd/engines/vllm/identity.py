"""Which model a served teacher serves, checked before its first score: a server of another model (the student,
say) would score every token, and the run would distil towards the wrong model without a word.

The server's `/v1/models` entry names its model twice: `id` (the served name, by default the `--model` argument)
and `root` (the path it loaded). How strict:
- either names `teacher.path` (the same string, or the same folder here): served as configured;
- either names `student.path` (and the teacher is not the student itself): refused;
- `root` is a folder readable here whose config.json differs from teacher.path's in the model's shape
  (`SHAPE_KEYS`): refused, naming the key;
- else (a server on another machine, whose paths differ from the trainer's) a warning where no name ends in
  teacher.path's last component; nothing where one does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mmopd.config import ConfigError

log = logging.getLogger("mmopd")

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")


def check_served_model(url: str, path: str, student_path: str, served: dict[str, Any]) -> None:
    """Refuse (ConfigError) a teacher server at `url` whose `/v1/models` entry `served` names another model than
    teacher `path`, as the module says; warn where it cannot tell."""
    names = [str(served[key]) for key in ("root", "id") if served.get(key)]
    if any(_same(name, path) for name in names):
        return
    if student_path and not _same(student_path, path) and any(_same(name, student_path) for name in names):
        raise ConfigError(f"the teacher server at {url} serves {names[0]}, which is student.path, not "
                          f"teacher.path={path}: it would score the student against itself; serve the teacher there "
                          "(`mmopd serve teacher CONFIG`) or fix teacher.url")
    difference = _shape_difference(served.get("root"), path)
    if difference:
        raise ConfigError(f"the teacher server at {url} serves {served['root']}, whose {difference}; serve "
                          "teacher.path there (`mmopd serve teacher CONFIG`) or fix teacher.url")
    if not any(Path(name.rstrip("/")).name == Path(path.rstrip("/")).name for name in names):
        log.warning("the teacher server at %s serves %s, and teacher.path is %s: check that it is the same model",
                    url, " / ".join(dict.fromkeys(names)) or "a model it does not name", path)


def _same(a: str, b: str) -> bool:
    """Whether two model names are one: the same string, or the same folder on this machine."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def _shape(path: Any) -> dict[str, Any] | None:
    """The shape keys of the model config in folder `path` (a multimodal config's text part's as well), or None
    where it cannot be read here."""
    try:
        config = json.loads((Path(str(path)) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or {}
    return {key: config.get(key, text.get(key)) for key in SHAPE_KEYS}


def _shape_difference(root: Any, path: str) -> str | None:
    """How the served folder's config differs from teacher.path's in shape ("hidden_size is 64, teacher.path's
    128"), or None where they agree or either cannot be read."""
    served, configured = _shape(root) if root else None, _shape(path)
    if served is None or configured is None:
        return None
    for key in SHAPE_KEYS:
        if served[key] != configured[key]:
            return f"{key} is {served[key]!r}, teacher.path's {configured[key]!r}"
    return None
