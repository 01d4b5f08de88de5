#!/usr/bin/env python3
"""scripts/qemu-series-touches.py [PATCHES_DIR]: for each patch of the
series (qemu-patches/ by default), the upstream files it touches and the
functions it changes (from the hunks' context headers and the lines it
changes) or adds, as the Markdown table qemu-patches/README.md carries.
What a rebase onto a newer QEMU has to look at first: a patch whose files
and functions upstream changed since the base is the one to check by hand.
"""

import os
import re
import sys

FUNC_DEF = re.compile(r"^[+ -](?:static\s+)?(?:inline\s+)?[A-Za-z_][\w\s\*]*?\b([a-z_]\w*)\(.*\)\s*$")
HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@ ?(.*)$")


def touches(path):
    files = []  # (file, is_new, [functions])
    cur = None
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("diff --git "):
            cur = [line.split(" b/", 1)[1], False, []]
            files.append(cur)
        elif cur is None:
            continue
        elif line.startswith("new file mode"):
            cur[1] = True
        elif line.startswith("@@"):
            m = HUNK.match(line)
            ctx = m.group(1) if m else ""
            f = re.search(r"\b([a-z_]\w*)\(", ctx)
            if f and not cur[1] and cur[0].endswith((".c", ".h")):
                add(cur[2], f.group(1))
        elif line[:1] in "+-" and not line.startswith(("+++", "---")):
            m = FUNC_DEF.match(line)
            if m and not cur[1] and cur[0].endswith(".c") and not line.rstrip().endswith(";"):
                name = m.group(1) + (" (new)" if line[0] == "+" else " (removed)")
                add(cur[2], name)
    return files


def add(lst, name):
    base = name.split(" ")[0]
    if not any(x.split(" ")[0] == base for x in lst):
        lst.append(name)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    pdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "qemu-patches")
    names = []
    for line in open(os.path.join(pdir, "series"), encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    print("| # | upstream files (functions changed; new files) |")
    print("|---|---|")
    for i, name in enumerate(names, 1):
        parts = []
        for f, new, funcs in touches(os.path.join(pdir, name)):
            if new:
                parts.append(f"`{f}` (new)")
            elif funcs:
                parts.append(f"`{f}`: " + ", ".join(f"`{x}`" for x in funcs))
            else:
                parts.append(f"`{f}`")
        print(f"| {i} | " + "; ".join(parts) + " |")


if __name__ == "__main__":
    main()
