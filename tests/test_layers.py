"""Dependencies point one way (DESIGN.md, Layout): the cores import no I/O, nothing but users
and tests imports the client, and the daemon starts actors as processes, never imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"pvhub": REPO / "pvhub", "pvhub.daemon": REPO / "daemon",
            "pvhub.actors": REPO / "actors", "pvhub.client": REPO / "client"}


def _package_of(path: Path) -> str:
    for package, root in PACKAGES.items():
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            if package == "pvhub" and parts[0] == "testing":
                return "pvhub.testing"
            return ".".join((package, *parts[:-1]))
    raise AssertionError(f"{path} is in no package")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, and each name taken from one as a module too:
    ``from pvhub import testing`` and ``from . import x`` count as ``pvhub.testing``, ``<pkg>.x``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, packages: str | tuple[str, ...]) -> bool:
    """``name`` is one of ``packages`` or inside one (``pvhub.client_x`` is not ``pvhub.client``)."""
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == package or name.startswith(package + ".") for package in packages)


def modules(package: str):
    """The package's modules, its subpackages' too (``client/ophyd_async``), but not
    ``pvhub.testing``: the harness may import anything."""
    root = PACKAGES[package]
    return sorted(path for path in root.rglob("*.py")
                  if not (package == "pvhub" and path.parent != root))


def test_imports_of_sees_modules_taken_by_name_and_relative_imports(tmp_path, monkeypatch):
    client = tmp_path / "client"
    client.mkdir()
    module = client / "thing.py"
    module.write_text("from pvhub import testing\nfrom . import hub\nfrom .values import x\nimport zmq\n")
    monkeypatch.setitem(PACKAGES, "pvhub.client", client)
    assert {"pvhub.testing", "pvhub.client.hub", "pvhub.client.values", "zmq"} <= imports_of(module)


@pytest.mark.parametrize("package", ["pvhub.daemon", "pvhub.actors"])
def test_daemon_and_actors_do_not_import_the_client(package):
    for path in modules(package):
        assert not any(within(n, "pvhub.client") for n in imports_of(path)), path.name


def test_daemon_does_not_import_actors():
    for path in modules("pvhub.daemon"):
        assert not any(within(n, "pvhub.actors") for n in imports_of(path)), path.name


def test_client_and_actors_import_only_the_shared_root_of_the_others():
    for path in modules("pvhub.client"):
        assert not any(within(n, ("pvhub.daemon", "pvhub.actors")) for n in imports_of(path)), path.name
    for path in modules("pvhub.actors"):
        assert not any(within(n, ("pvhub.daemon", "pvhub.client")) for n in imports_of(path)), path.name


@pytest.mark.parametrize("core, allowed", [
    (REPO / "actors" / "state.py", set()), (REPO / "actors" / "coercion.py", set()),
    (REPO / "daemon" / "routing.py", set()),
    (REPO / "daemon" / "effects.py", set()), (REPO / "daemon" / "placement.py", set()),
    (REPO / "daemon" / "clients.py", set()), (REPO / "daemon" / "status.py", set()),
    (REPO / "pvhub" / "protocol.py", set()), (REPO / "pvhub" / "arrays.py", set()),
    (REPO / "pvhub" / "messages.py", set()), (REPO / "pvhub" / "message_checks.py", set()),
    (REPO / "pvhub" / "readings.py", set()),
    (REPO / "pvhub" / "config.py", set()),
    (REPO / "client" / "requests.py", set()),
    (REPO / "client" / "liveness.py", {"threading"}),  # only for the Event other threads wait on
])
def test_cores_do_no_io(core, allowed):
    io = {"zmq", "caproto", "asyncio", "socket", "subprocess", "threading"} - allowed
    found = {n.split(".")[0] for n in imports_of(core)} & io
    assert not found, f"{core.name} imports {found}"


def test_shared_root_does_not_import_the_sides():
    # pvhub.cli and pvhub.demo are entry points: they may start anything.
    entry_points = {"cli.py", "demo.py", "__main__.py"}
    for path in modules("pvhub"):
        if path.name in entry_points:
            continue
        assert not any(within(n, ("pvhub.daemon", "pvhub.actors", "pvhub.client"))
                       for n in imports_of(path)), path.name


def test_nothing_that_runs_in_production_imports_the_testing_harness():
    """``pvhub.testing`` (simulated IOCs, daemons started by a test) is for tests, benchmarks
    and the demo; the daemon, its actors and the client library never need it."""
    for package in ("pvhub", "pvhub.daemon", "pvhub.actors", "pvhub.client"):
        for path in modules(package):
            if package == "pvhub" and path.name == "demo.py":
                continue
            assert not any(within(n, "pvhub.testing") for n in imports_of(path)), f"{package}: {path.name}"


def test_the_client_library_does_not_import_ophyd_or_caproto():
    """``import pvhub.client`` stays light: ophyd (seconds, threads) and Channel Access are for
    the modules that need them (``pvhub.client.ophyd_layer``, the daemon's actors)."""
    import subprocess
    import sys

    code = "import sys, pvhub.client; print(sorted(m for m in ('ophyd', 'caproto', 'epics') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
