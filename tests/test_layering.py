"""Dependencies point one way (docs/design.md, "Layout"): each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

RECON = Path(__file__).resolve().parent.parent / "recon"


def imports_of_each_module():
    """{module name under recon/, e.g. 'render.volume': set of recon modules it imports, e.g. {'mesh.data'}}."""
    found = {}
    for path in RECON.rglob("*.py"):
        name = ".".join(path.relative_to(RECON).with_suffix("").parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "recon":
                base = node.module.split(".")[1:]
                # `from recon import hub` imports recon.hub; `from recon.mesh.data import X` imports recon.mesh.data
                imported.update([".".join(base + [a.name]) for a in node.names] if not base else [".".join(base)])
            elif isinstance(node, ast.Import):
                imported.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("recon."))
        found[name] = imported
    return found


def offenders(may_import, *, importers=None, imported_prefix):
    """(importer, imported) pairs where ``imported`` starts with ``imported_prefix`` and the importer may not."""
    return sorted(
        (module, target)
        for module, targets in imports_of_each_module().items()
        for target in targets
        if (target == imported_prefix or target.startswith(imported_prefix + "."))
        and (importers is None or module == importers or module.startswith(importers + "."))
        and not may_import(module, target)
    )


def test_only_the_cli_and_bench_import_bench():
    allowed = lambda module, _: module.startswith("bench") or module in ("cli",)  # noqa: E731
    assert offenders(allowed, imported_prefix="bench") == []
    # the check sees real imports: with no exception allowed, the CLI's import of the runner shows up
    assert ("cli", "bench.runner") in offenders(lambda *_: False, imported_prefix="bench")


# The ways in: the command line, the Python API and the web app built on it.
ENTRY_POINTS = ("cli", "__main__", "api", "app")


def test_only_the_entry_points_import_the_pipeline_and_cli():
    allowed = lambda module, _: module.startswith("bench") or module in ENTRY_POINTS  # noqa: E731
    assert offenders(allowed, imported_prefix="pipeline") == []
    assert offenders(allowed, imported_prefix="cli") == []


def test_renderers_see_only_mesh_data():
    # render/ draws meshes, so it knows their container; extraction, texturing and export sit above it.
    allowed = lambda _, target: target == "mesh.data"  # noqa: E731
    assert offenders(allowed, importers="render", imported_prefix="mesh") == []


def test_fields_import_no_stage_above_them():
    for above in ("render", "mesh", "prior", "eval", "fit", "gate", "prepare"):
        assert offenders(lambda *_: False, importers="field", imported_prefix=above) == [], above


def test_eval_does_not_reach_into_the_fit_or_the_priors():
    for above in ("fit", "prior", "gate", "prepare"):
        assert offenders(lambda *_: False, importers="eval", imported_prefix=above) == [], above
