"""The schemas of the ``lavae_fast`` ops, read from ``lavae_fast/op_schemas.inc`` (the package's folder).

That file is the one source of the ops' names and schemas: :mod:`lavae_fast.ops` and
:mod:`lavae_fast.norm` define their ops from it (:func:`define`), and the C++ test driver
(``tests/cpp/test_kernels.cpp``, built by CMakeLists.txt) includes the same file, defines the ops
from it and checks the CPU kernels that ``csrc/dispatch.cpp`` registers against it. It is a file
both languages read as is (one C string literal per line), so neither side generates anything, the
Python side needs no C++ build (the reference fallback defines the same ops), and an installed
package finds it as package data (setup.py). This module imports nothing of the package.
"""

from __future__ import annotations

import os
import re

# In the package's folder, not the engine's: the C++ test driver (CMakeLists.txt) includes it from there.
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "op_schemas.inc")

_SCHEMA_LINE = re.compile(r'"([^"\\]+)",')
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def read(path: str = PATH) -> dict[str, str]:
    """{op name: schema} in file order. Raises ValueError on a line that is not a schema line (the
    C++ driver would read it differently) or a repeated name."""
    schemas: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("//"):
                continue
            m = _SCHEMA_LINE.fullmatch(text)
            if m is None:
                raise ValueError(f"{path}:{lineno}: expected a line '\"<schema>\",', got {text!r}")
            schema = m.group(1)
            name = schema.split("(", 1)[0]
            if not _NAME.fullmatch(name):
                raise ValueError(f"{path}:{lineno}: {name!r} is not an op name")
            if name in schemas:
                raise ValueError(f"{path}:{lineno}: op {name!r} is defined twice")
            schemas[name] = schema
    return schemas


SCHEMAS: dict[str, str] = read()

# The C++ extension carries the digest of the schemas it was built from as the bytes
# STAMP_PREFIX + digest + b";" (csrc/module.cpp; setup.py passes the digest), so that a build older
# than the schemas is found by reading the file, before loading it: loading it would abort the
# process (its kernels' registration fails a schema check inside a static initialiser).
STAMP_PREFIX = b"lavae_fast-op-schemas:"


def digest(schemas: dict[str, str] | None = None) -> str:
    """16 hex digits of the SHA-256 of the schemas (one per line, file order): comments and blank
    lines of op_schemas.inc do not change it."""
    import hashlib

    text = "\n".join((SCHEMAS if schemas is None else schemas).values())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def extension_digest(path: str) -> str | None:
    """The schema digest stamped into the compiled extension at ``path``, or None if it has none."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        i = m.find(STAMP_PREFIX)
        if i < 0:
            return None
        j = m.find(b";", i, i + len(STAMP_PREFIX) + 64)
        return m[i + len(STAMP_PREFIX): j].decode("ascii", "replace") if j > 0 else None


def define(lib, names) -> None:
    """Define the ops ``names`` (of :data:`SCHEMAS`) on the ``torch.library.Library`` ``lib``."""
    for name in names:
        lib.define(SCHEMAS[name])
