"""Write the oldest versions that pyproject.toml allows, one ``name==floor`` a line.

Used by ``tox -e test-oldestdeps``: the package is installed with its extras as
usual, then these pins move every direct dependency down to its declared floor
(what ``uv pip install --resolution lowest-direct`` does). Transitive
dependencies are left to the resolver.

torch and torchvision are not pinned: only the current releases can be
installed on the machines that run the tests (see docs/install.rst).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

#: installed as they are (see the module docstring)
KEEP = {"torch", "torchvision"}
#: test tooling: not part of what users install
TOOLING_EXTRAS = {"test", "docs"}


def requirements(project: dict, extras: list[str]) -> list[str]:
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(r"astrovl\[([^\]]+)\]", req.split(";")[0].strip())
            if self_ref:
                todo.extend(e.strip() for e in self_ref.group(1).split(","))
            elif extra not in TOOLING_EXTRAS:
                reqs.append(req)
    return reqs


def pins(reqs: list[str]) -> list[str]:
    out = {}
    for req in reqs:
        req = req.split("#")[0].split(";")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,\s]*)(,.*)?", req)
        if not m:
            continue  # no floor declared
        name = m.group(1).lower().replace("_", "-")
        if name in KEEP:
            continue
        out[name] = f"{m.group(1)}{m.group(2) or ''}=={m.group(3)}"
    return sorted(out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--extras", default="all", help="comma-separated extras (default: all)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    lines = pins(requirements(project, [e for e in args.extras.split(",") if e]))
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
