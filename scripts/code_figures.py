"""Size figures of the package's code (issue 14's targets): lines per module, modules over 600
lines, functions over 80 lines and the longest function.

    python scripts/code_figures.py [ROOT]      # ROOT: src/ by default

A module's lines are its physical lines (``wc -l``). A function's length runs from its ``def``
line to its last line (``ast``'s ``lineno`` .. ``end_lineno``: decorators not counted, docstring
and comments inside counted); methods and nested functions are counted on their own, with their
qualified names.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MODULE_LIMIT = 600
FUNCTION_LIMIT = 80


def functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function and method in ``tree``."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent
                                                         / "src"))
    args = parser.parse_args(argv)
    root = Path(args.root)
    modules = sorted(root.rglob("*.py"))
    if not modules:
        print(f"no Python files under {root}", file=sys.stderr)
        return 2
    sizes: list[tuple[str, int]] = []
    long_functions: list[tuple[str, int]] = []
    longest: list[str] = []
    longest_length = 0
    for path in modules:
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(root))
        sizes.append((name, len(text.splitlines())))
        for function, line, length in functions(ast.parse(text, filename=str(path))):
            where = f"{name}:{line} {function}"
            if length > FUNCTION_LIMIT:
                long_functions.append((where, length))
            if length > longest_length:
                longest, longest_length = [where], length
            elif length == longest_length:
                longest.append(where)

    print(f"lines per module under {root} ({len(sizes)} modules, "
          f"{sum(n for _, n in sizes)} lines)")
    for name, lines in sorted(sizes, key=lambda item: -item[1]):
        print(f"  {lines:5d}  {name}")
    over = [(name, lines) for name, lines in sizes if lines > MODULE_LIMIT]
    print(f"modules over {MODULE_LIMIT} lines: {len(over)}")
    for name, lines in sorted(over, key=lambda item: -item[1]):
        print(f"  {lines:5d}  {name}")
    print(f"functions over {FUNCTION_LIMIT} lines: {len(long_functions)}")
    for where, length in sorted(long_functions, key=lambda item: -item[1]):
        print(f"  {length:5d}  {where}")
    print(f"longest function ({longest_length} lines): {'; '.join(longest)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
