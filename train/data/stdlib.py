"""The standard library of the running interpreter as a dataset (nothing to download).

- ``code``: one text record per ``.py`` module (a pretraining corpus).
- ``instruct``: one conversation per documented function or method: the user
  gives the signature and docstring (``ast.unparse`` of the function with only
  its docstring as body), the assistant answers with the body
  (``ast.unparse`` of the remaining statements).

Deterministic for a given Python version: modules are visited in sorted order
and the held-out split is chosen per *module* by a hash of its relative path
(functions of one module never straddle train and test).
"""

import ast
import copy
import hashlib
import pathlib
import sysconfig

INSTRUCTION = "Write the body of this Python function.\n\n"
# Package folders that are tests or vendored tools, not library code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "turtledemo", "venv", "ensurepip"}
MAX_BODY_CHARS = 2000


def stdlib_root() -> pathlib.Path:
    """The running interpreter's stdlib folder (``sysconfig.get_paths()["stdlib"]``)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(modules=None) -> list[pathlib.Path]:
    """Relative paths of the stdlib modules, sorted; ``modules`` restricts them to these
    relative paths or folder prefixes (e.g. ``["textwrap.py", "json/"]``)."""
    root = stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if modules is not None and not any(
                str(rel) == m or str(rel).startswith(m.rstrip("/") + "/") for m in modules):
            continue
        files.append(rel)
    return files


def is_heldout(rel_path, fraction: float) -> bool:
    """Whether module ``rel_path`` belongs to the held-out split (stable hash)."""
    digest = hashlib.sha256(str(rel_path).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def instruction_pairs(source: str, rel_path) -> list[tuple[str, str, int]]:
    """``(instruction, body, line)`` for each function in ``source`` with a docstring
    and a non-trivial body of at most ``MAX_BODY_CHARS`` characters."""
    tree = ast.parse(source)
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc is None:
            continue
        rest = node.body[1:]
        if not rest or all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(
                s.value, ast.Constant) and s.value.value is Ellipsis) for s in rest):
            continue
        body = ast.unparse(ast.Module(body=rest, type_ignores=[]))
        if len(body) > MAX_BODY_CHARS:
            continue
        header = copy.copy(node)
        header.body = node.body[:1]
        pairs.append((INSTRUCTION + ast.unparse(header), body, node.lineno))
    return sorted(pairs, key=lambda p: p[2])


def stdlib_records(kind: str, modules, problems, counts):
    """Yield ``(split, record)`` for every stdlib record of ``kind`` ("code" | "instruct").

    Modules that are not UTF-8 or do not parse are reported to ``problems``.
    """
    root = stdlib_root()
    for rel in stdlib_files(modules):
        where = f"{root / rel}:1"
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            counts["read"] += 1
            problems.report("not_utf8", where, f"invalid UTF-8 byte at offset {e.start}")
            continue
        if kind == "code":
            counts["read"] += 1
            if not text.strip():
                problems.report("empty", where, "empty module")
                continue
            yield rel, {"messages": [], "text": text, "source": where}
            continue
        try:
            pairs = instruction_pairs(text, rel)
        except SyntaxError as e:
            counts["read"] += 1
            problems.report("malformed_source", f"{root / rel}:{e.lineno}", str(e.msg))
            continue
        for instruction, body, line in pairs:
            counts["read"] += 1
            yield rel, {"messages": [{"role": "user", "content": instruction},
                                     {"role": "assistant", "content": body}],
                        "text": "", "source": f"{root / rel}:{line}"}
