"""The one table format every bench script prints (markdown, columns padded so the raw output reads as a table)."""

from __future__ import annotations


def print_table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> None:
    w = [max(len(str(r[i])) for r in [*rows, head]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print(line(r))
