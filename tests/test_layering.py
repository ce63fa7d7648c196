"""Imports flow one way along the pipeline (docs/design.md, "Module layering").

Every module of ``adp_pass`` (``adp_pass/``, ``patterns/``, ``runtime/``) belongs to a layer; a
layer may import only the layers it lists in ``MAY_IMPORT``, all of them earlier ones. Imports
are read with ``ast`` (function-level ones included), so nothing is imported here: the test
takes well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Package name -> directory, as pyproject.toml maps them.
PACKAGE_DIRS = {
    "adp_pass": ROOT / "adp_pass",
    "adp_pass.patterns": ROOT / "patterns",
    "adp_pass.runtime": ROOT / "runtime",
}

# In pipeline order. A module not listed here is an entry point (the top layer): it may import
# anything, and nothing below may import it.
LAYERS: dict[str, tuple[str, ...]] = {
    # Torch-free definitions and the FX vocabulary every stage speaks.
    "foundation": (
        "adp_pass", "adp_pass.errors", "adp_pass.fx_vocab", "adp_pass.attributes",
        "adp_pass.mapping", "adp_pass.families", "adp_pass.families.*", "adp_pass.presets",
        "adp_pass.tokenizer", "adp_pass.checks", "adp_pass.fp8", "adp_pass.runtime",
        # The rank wing's typed contract: what front ends and ranks exchange, torch-free.
        "adp_pass.runtime.contract",
        # The serving geometry, defined once (torch-free): the contract, the front end, the
        # cost model and the rank build read it, so it sits below all of them.
        "adp_pass.runtime.serving_config",
        # What stages leave on a graph (its one meta record) and the stages' typed reports:
        # plain data that capture, rewrite, the lowering and the build cache all write or read.
        "adp_pass.graph_record", "adp_pass.stage_reports",
    ),
    # Plain data between detect and rewrite; the site patterns already produce its Sites.
    "plan": ("adp_pass.plan",),
    # The captured graph's linears made FP8 for an FP8 checkpoint (adp_pass/fp8_linears.py).
    "capture": ("adp_pass.capture", "adp_pass.stamp", "adp_pass.fp8_linears"),
    "patterns": ("adp_pass.patterns", "adp_pass.patterns.*"),
    # Which dims grow, shape fixes and their proof: used by detect (plan) and rewrite (check).
    "sharding": ("adp_pass.layouts", "adp_pass.sharding_rules", "adp_pass.sharding",
                 "adp_pass.shapes"),
    "detect": ("adp_pass.detect",),
    "rewrite": ("adp_pass.rewrite", "adp_pass.self_check"),
    "lower": ("adp_pass.runtime.kernels", "adp_pass.runtime.kernels.*",
              "adp_pass.runtime.lower", "adp_pass.runtime.lower.*",
              "adp_pass.runtime.cache_insertion"),
    # What a built rank runs with: weights, KV cache, groups, engine, build cache, launching.
    "runtime": ("adp_pass.runtime.kv_cache", "adp_pass.runtime.weights",
                "adp_pass.runtime.groups", "adp_pass.runtime.lockstep",
                "adp_pass.runtime.sampling", "adp_pass.runtime.runner",
                "adp_pass.runtime.scheduler", "adp_pass.runtime.engine",
                "adp_pass.runtime.build_cache", "adp_pass.launch"),
    "entry": (),
}
ORDER = list(LAYERS)

# Narrower than "every earlier layer" where a stage should not know another: rewrite executes a
# plan whoever made it (no detect, no patterns); the lowering and the KV-cache insertion work on
# any graph of ATen ops (no site patterns, no plan); the runtime reads plans, never makes them.
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": set(),
    "plan": {"foundation"},
    "capture": {"foundation"},
    "patterns": {"foundation", "plan"},
    "sharding": {"foundation", "plan"},
    "detect": {"foundation", "plan", "patterns", "sharding"},
    "rewrite": {"foundation", "plan", "sharding"},
    "lower": {"foundation"},
    "runtime": {"foundation", "plan", "lower"},
    "entry": set(ORDER[:-1]),
}

# (importer, "module.name") pairs allowed for now, each with the reason; the test fails once one
# is no longer needed, so the list only shrinks.
PENDING_PRIVATE_IMPORTS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def layer_of(module: str) -> str:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and
                                     module.startswith(pattern[:-1])):
                return layer
    return "entry"


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every project import in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                # ``from pkg import submodule`` imports the submodule; else a name of ``base``.
                found.append((child, None) if child in MODULES else (base, alias.name))
    return [(m, name) for m, name in found if m.split(".")[0] == "adp_pass"]


def test_layers_only_import_earlier_layers():
    for layer, allowed in MAY_IMPORT.items():
        earlier = set(ORDER[: ORDER.index(layer)])
        assert allowed <= earlier, f"{layer} may import {allowed - earlier}, a later layer"


def test_every_import_goes_to_an_allowed_layer():
    wrong = []
    for module, path in sorted(MODULES.items()):
        layer = layer_of(module)
        for target, _ in _imports(module, path):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in MAY_IMPORT[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not wrong, ("imports against the layering (a new module is an entry point until "
                       "LAYERS places it):\n" + "\n".join(wrong))


def test_no_private_names_across_layers():
    used, wrong = set(), []
    for module, path in sorted(MODULES.items()):
        for target, name in _imports(module, path):
            if name is None or not name.startswith("_") or layer_of(target) == layer_of(module):
                continue
            key = (module, f"{target}.{name}")
            if key in PENDING_PRIVATE_IMPORTS:
                used.add(key)
            else:
                wrong.append(f"{module} imports {target}.{name}")
    assert not wrong, "private names used from another layer:\n" + "\n".join(wrong)
    assert used == set(PENDING_PRIVATE_IMPORTS), (
        f"no longer needed, remove from PENDING_PRIVATE_IMPORTS: "
        f"{set(PENDING_PRIVATE_IMPORTS) - used}")


def test_layers_name_existing_modules():
    named = [p for patterns in LAYERS.values() for p in patterns if not p.endswith(".*")]
    # The lead's stamping module may not exist yet in every checkout.
    missing = [m for m in named if m not in MODULES and m != "adp_pass.stamp"]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"
