#!/usr/bin/env python3
"""The examples of the docs (docs/src), as scripts that scripts/test-docs.sh runs.

    docs_examples.py SRC OUT [PAGE...]

For each PAGE given (README.md) and each page of SRC/SUMMARY.md, in order, writes to OUT:
- NN-page.sql: every ```sql block of the page, in order, and the hidden set-up blocks
  (an HTML comment that starts with `<!-- sql`, which the book does not show), each preceded by
  a comment naming the page and line, for `psql -v ON_ERROR_STOP=1` in a fresh database;
- NN-page.sh: every ```sh block of the page (run with `bash -euo pipefail` after the SQL).
Blocks whose info string says `no_run` (```sh no_run: commands for the reader's own machine, such
as installing a package) are counted, not run. Prints one line per page: its name and counts.
"""
import os
import re
import sys

FENCE = re.compile(r"^(\s*)```(.*?)\s*$")


def pages(src, extra):
    yield from extra
    for line in open(os.path.join(src, "SUMMARY.md"), encoding="utf-8"):
        m = re.search(r"\]\(([^)]+\.md)\)", line)
        if m:
            yield m.group(1)


def blocks(path):
    """(kind, first line number, text) of each example of a page."""
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if line.strip().startswith("<!-- sql"):
            body = []
            rest = line.strip()[len("<!-- sql"):]
            start = i + 1
            while "-->" not in rest:
                body.append(rest)
                i += 1
                if i >= len(lines):
                    raise SystemExit(f"{path}:{start}: hidden sql block is not closed")
                rest = lines[i]
            body.append(rest[: rest.index("-->")])
            yield "sql", start, "\n".join(body)
        elif m:
            indent, info = m.group(1), m.group(2)
            start = i + 1
            body = []
            i += 1
            while i < len(lines) and not (lines[i].strip() == "```" and lines[i].startswith(indent)):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            if i >= len(lines):
                raise SystemExit(f"{path}:{start}: code block is not closed")
            words = re.split(r"[ ,]+", info.strip())
            lang, attrs = words[0], words[1:]
            if "no_run" in attrs:
                yield "no_run", start, ""
            elif lang == "sql":
                yield "sql", start + 1, "\n".join(body)
            elif lang in ("sh", "bash"):
                yield "sh", start + 1, "\n".join(body)
        i += 1


def main():
    src, out, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    for n, page in enumerate(pages(src, extra)):
        path = page if page in extra else os.path.join(src, page)
        name = os.path.basename(page) if page in extra else page
        stem = f"{n:02d}-" + name.replace("/", "-")[: -len(".md")]
        sql, sh, skipped = [], [], 0
        for kind, line, text in blocks(path):
            where = f"{page}:{line}"
            if kind == "sql":
                sql.append(f"\\set docs_example '{where}'\n-- {where}\n{text}\n")
            elif kind == "sh":
                sh.append(f"# {where}\necho '--- {where}' >&2\n{text}\n")
            else:
                skipped += 1
        if sql:
            with open(os.path.join(out, stem + ".sql"), "w", encoding="utf-8") as f:
                f.write("\n".join(sql))
        if sh:
            with open(os.path.join(out, stem + ".sh"), "w", encoding="utf-8") as f:
                f.write("\n".join(sh))
        print(f"{stem} {len(sql)} {len(sh)} {skipped}")


if __name__ == "__main__":
    main()
