"""Imports run one way, even lazy ones inside functions:

    streams.cli ─► streams.service, streams.embedded ─► inference
                   (streams.embedded ─► streams.service)

no module of ours imports one that imports it back; ``streams.service`` never imports
``streams.cli`` or ``streams.embedded``; ``streams.embedded`` never imports ``streams.cli``;
``inference`` never imports ``streams``, Faust or Kafka clients; every module of ``streams``
sits in one of its layers. Inside ``inference``, by where code runs:

    inference.client ─► inference.records ─► inference.errors, inference.settings
    inference.worker ─►        (inference.client ─► inference.worker.plugin only)

``inference.worker`` never imports ``inference.client``; ``inference.records`` neither side;
the stream side (``streams.service``, ``streams.cli``) never imports ``inference.worker``."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("inference", "streams")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


GRAPH = {
    module_name(path): imports(path)
    for package in PACKAGES
    for path in sorted((REPO / package).rglob("*.py"))
}
OURS = set(GRAPH)


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def edges(module: str) -> set[str]:
    return {name for name in GRAPH[module] if name in OURS and name != module}


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges(module)):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("inference")))
def test_inference_never_imports_streams_faust_or_kafka(module):
    forbidden = {name for name in GRAPH[module] if name.split(".")[0] in ("streams", "faust", "aiokafka", "confluent_kafka", "mode")}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


# where inference's code runs: what each part may not import (a prefix matches the package and its modules)
INFERENCE_FORBIDDEN = {
    "inference.records": ("inference.client", "inference.worker", "torch", "torchvision", "PIL", "distributed", "dask"),
    "inference.worker": ("inference.client",),
    "inference.client": ("inference.worker",),  # but its plugin: INFERENCE_SEAM
    "inference.errors": ("inference.client", "inference.worker", "inference.records", "inference.settings"),
    "inference.settings": ("inference.client", "inference.worker", "inference.records"),
}
INFERENCE_SEAM = "inference.worker.plugin"  # the client registers this plugin and submits its task
INFERENCE_TOP_LEVEL = {"inference", "inference.errors", "inference.settings"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("inference")))
def test_every_inference_module_sits_where_it_runs(module):
    assert module in INFERENCE_TOP_LEVEL or any(inside(module, f"inference.{part}") for part in ("client", "worker", "records")), (
        f"{module}: put it in inference.client (the caller's process), inference.worker (a Dask "
        "worker) or inference.records (what both share)"
    )


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("inference")))
def test_inference_imports_run_one_way_between_where_code_runs(module):
    forbidden = next((banned for part, banned in INFERENCE_FORBIDDEN.items() if inside(module, part)), ())
    wrong = {
        name for name in GRAPH[module]
        if any(inside(name, package) for package in forbidden) and not inside(name, INFERENCE_SEAM)
        and (name in OURS or not name.startswith("inference"))
    }
    assert not wrong, f"{module} imports {sorted(wrong)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if inside(m, "streams.service") or inside(m, "streams.cli")))
def test_the_stream_side_never_imports_the_dask_workers_code(module):
    wrong = {name for name in edges(module) if inside(name, "inference.worker")}
    assert not wrong, f"{module} imports {sorted(wrong)}: code that runs on a Dask worker"


# what each layer of streams may not import (a prefix matches the package and its modules)
FORBIDDEN = {
    "streams.service": ("streams.cli", "streams.embedded"),
    "streams.embedded": ("streams.cli",),
    "streams.errors": ("streams.cli", "streams.service", "streams.embedded"),
}
TOP_LEVEL = {"streams", "streams.__main__", "streams.errors"}  # everything else sits in a layer


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("streams")))
def test_streams_layers_import_downwards(module):
    forbidden = next((banned for layer, banned in FORBIDDEN.items() if inside(module, layer)), ())
    upward = {name for name in edges(module) if any(inside(name, package) for package in forbidden)}
    assert not upward, f"{module} imports {sorted(upward)}, a layer above it"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("streams")))
def test_every_streams_module_sits_in_a_layer(module):
    assert module in TOP_LEVEL or any(inside(module, f"streams.{layer}") for layer in ("cli", "service", "embedded")), (
        f"{module}: put it in streams.cli (commands), streams.service (the running service) "
        "or streams.embedded (tooling)"
    )


def test_only_the_entry_point_imports_the_cli():
    importers = {module for module in GRAPH if not inside(module, "streams.cli") and any(inside(n, "streams.cli") for n in edges(module))}
    assert importers <= {"streams.__main__"}, f"{sorted(importers)} import streams.cli"


def test_the_stream_worker_and_the_clients_never_import_torch():
    """A stream worker never runs the model: importing torch would cost each replica about 700 MB
    and seconds of start-up (measured). Only ``inference.worker.runtime`` (on Dask workers) needs it."""
    import subprocess
    import sys

    modules = [
        "streams.cli.main", "streams.cli.commands", "streams.service.agents", "streams.service.process",
        "streams.service.app", "streams.service.lag", "streams.service.reconcile", "streams.service.backfill",
        "inference.client.cluster", "inference.client.job", "inference.client.notebook", "inference.worker.plugin",
        "inference.records.evaluation", "inference.records.report",
    ]
    probe = f"import sys, {', '.join(modules)}; print(sorted(m for m in ('torch', 'torchvision', 'PIL') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
