"""Prompts that nobody here wrote: the opening words of Python's standard-library docstrings.

They are on every machine that runs Python, so a real-model run needs no download. A prompt is the first
`words` words of the first paragraph of a public function's or class's docstring, from the modules named. Split
by module, so that held-out prompts come from modules the student never trained on:

    train = docstring_prompts(TRAIN_MODULES)      # ~250 prompts
    held_out = docstring_prompts(HELD_OUT_MODULES)

The docstrings change a little between Python versions, so the prompts do too.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

TRAIN_MODULES = ("collections", "itertools", "functools", "os", "re", "json", "pathlib", "string", "textwrap",
                 "datetime", "random", "math", "heapq", "bisect", "typing", "io", "argparse", "logging", "csv",
                 "shutil", "subprocess", "threading", "socket", "urllib.parse", "email.message", "fractions",
                 "decimal", "enum", "dataclasses", "contextlib", "tempfile", "glob", "hashlib", "base64", "copy",
                 "operator", "calendar", "sqlite3", "tarfile", "gzip", "ipaddress", "queue", "secrets", "struct",
                 "unittest", "warnings", "weakref", "abc", "ast", "codecs", "configparser", "inspect", "pickle",
                 "traceback", "types")
HELD_OUT_MODULES = ("statistics", "zipfile", "difflib", "fnmatch", "uuid", "pprint", "html", "http.client", "locale",
                    "sched", "shlex", "time", "xml.etree.ElementTree", "zlib", "gettext", "numbers", "platform",
                    "plistlib")


def _own_members(module: object, name: str) -> list[object]:
    """The public functions and classes that `module` defines (not those it imports), in name order."""
    out = []
    for attr in sorted(dir(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        owner = str(getattr(obj, "__module__", ""))
        if owner.startswith(name) or owner == "_" + name.rsplit(".", 1)[-1]:  # C accelerators: _json, _heapq, ...
            out.append(obj)
    return out


def docstring_prompts(modules: tuple[str, ...] | list[str], words: int = 10, min_words: int = 8) -> list[str]:
    """The first `words` words of each docstring's first paragraph, for docstrings whose first paragraph has at
    least `min_words` words; distinct prompts, in module then name order."""
    if words < 1 or min_words < 1:
        raise ValueError(f"words and min_words must be positive, got {words} and {min_words}")
    seen: set[str] = set()
    prompts = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"standard-library module {name!r} does not import here: {error}") from None
        with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = [inspect.getdoc(obj) for obj in _own_members(module, name)]
        for doc in docs:
            first = (doc or "").split("\n\n")[0].split()
            if len(first) < min_words:
                continue
            prompt = " ".join(first[:words])
            if prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
    return prompts
