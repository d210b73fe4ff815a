"""Check that astrovl's subpackages import only from their own layer or below.

Run from the repository root::

    python docs/scripts/import_layers.py

It reads every module of ``astrovl`` and ``astrovl_napari`` with :mod:`ast`
(nothing is imported), collects the ``astrovl`` modules each one imports (at
module level or inside functions, including ``TYPE_CHECKING`` blocks), and
prints the imports between subpackages as a table. It exits with status 1, naming
the offending import, when a module imports from a higher layer, or from
another part of its own layer that ``SIDEWAYS`` does not list. The layers are those of
``docs/architecture.rst``.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

#: layer of each top-level part of the package (lower numbers are lower layers)
LAYERS = {
    # the floor: errors, settings, small helpers, package data
    "exceptions": 0, "config": 0, "_lazy": 0, "data": 0, "utils": 0, "reporting": 0,
    # images in, scaled for display
    "imaging": 1,
    # models and data
    "clip": 2, "llava": 2, "datasets": 2, "generation": 2,
    # public test helpers (tiny models in the releases' layouts); only tests import them
    "testing": 3,
    # what uses models and data
    "training": 3, "evaluation": 3,
    # the offline demonstration: a workflow over all of the above
    "demo": 4,
    # faces: parse arguments, requests or widget input and call the library
    "cli": 5, "serve": 5, "astrovl_napari": 5,
}

#: imports allowed between two parts of the same layer (importer, imported); the
#: floor's parts may import each other. Each pair goes one way only.
SIDEWAYS = {
    ("datasets", "generation"),  # the Hubble builder summarises abstracts (JSONLCache)
    ("training", "evaluation"),  # train_clip validates with top_k_percent_accuracy
    ("cli", "serve"),            # "astrovl serve" starts the web service
}


def part_of(module: str) -> str:
    """The part a dotted module name belongs to (``astrovl.clip.index`` -> ``clip``)."""
    bits = module.split(".")
    if bits[0] == "astrovl_napari":
        return "astrovl_napari"
    if len(bits) == 1:
        return "__init__"
    return bits[1]


def module_name(root: Path, file: Path) -> str:
    rel = file.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def front_door(root: Path) -> dict[str, str]:
    """``astrovl``'s top-level names and the modules that define them (``_LAZY``, ``conf``)."""
    tree = ast.parse((root / "astrovl" / "__init__.py").read_text(encoding="utf-8"))
    names = {"conf": "astrovl.config"}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            names.update(ast.literal_eval(node.value))
    return names


def imported_modules(file: Path, module: str) -> set[str]:
    """Absolute names of the astrovl modules ``file`` imports."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            # "from . import clip" names a submodule
            for a in node.names:
                found.add(f"{name}.{a.name}")
    return {m for m in found if m.split(".")[0] in ("astrovl", "astrovl_napari")}


def main(root: Path) -> int:
    edges = defaultdict(set)  # (importer part, imported part) -> modules
    exported = front_door(root)
    bad = []
    for pkg in ("astrovl", "astrovl_napari"):
        for file in sorted((root / pkg).rglob("*.py")):
            module = module_name(root, file)
            src = part_of(module)
            if src == "__init__":
                continue  # the package's front door re-exports from every layer
            for target in imported_modules(file, module):
                if target.count(".") == 1 and target.split(".")[0] == "astrovl":
                    # "from astrovl import X": the module that defines X
                    target = exported.get(target.split(".")[1], target)
                dst = part_of(target)
                if dst not in LAYERS:
                    continue  # a name re-exported by a package's __init__, not a module
                if dst == src:
                    continue
                edges[(src, dst)].add(module)
                if LAYERS[dst] > LAYERS[src] or (
                        LAYERS[dst] == LAYERS[src] > 0 and (src, dst) not in SIDEWAYS):
                    bad.append(f"{module} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    for (src, dst), modules in sorted(edges.items(), key=lambda e: (LAYERS[e[0][0]], e[0])):
        print(f"{src:>15} -> {dst:<12} ({len(modules)} module{'s' if len(modules) > 1 else ''})")
    if bad:
        print("\nimports against the layers:")
        print("\n".join(sorted(set(bad))))
        return 1
    sideways = sorted(e for e in edges if LAYERS[e[0]] == LAYERS[e[1]] > 0)
    print("\nno module imports from a higher layer; imports within a layer: "
          + ", ".join(f"{s} -> {d}" for s, d in sideways))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()))
