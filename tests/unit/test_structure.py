"""The layout's rules, checked on the source: which package may import which, the Engine
protocol implemented by the real engine and the tests' fake, and no `server` import name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import adapterserve
from adapterserve.hosting import protocol
from adapterserve.hosting.engine import VllmEngine
from tests.fakes import FakeEngine

PACKAGE = Path(adapterserve.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved), lazy ones included."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}  # `from . import x` names a module
    return found


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def offending(folder: str, allowed) -> dict[str, list[str]]:
    bad = {}
    for path in modules_under(folder):
        wrong = sorted(name for name in imports_of(path) if name.startswith("adapterserve.") and not allowed(name))
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = wrong
    return bad


def test_hosting_does_not_import_the_api_or_the_metrics():
    assert offending("hosting", lambda name: not name.startswith(("adapterserve.api", "adapterserve.metrics"))) == {}


# the door into hosting: the protocol, and serving a parsed request
HOSTING_DOOR = ("adapterserve.hosting.protocol", "adapterserve.hosting.serving")


def test_api_uses_the_hosts_only_through_the_protocol():
    def allowed(name):
        return name in ("adapterserve.hosting",) or not name.startswith("adapterserve.hosting") or name.startswith(HOSTING_DOOR)

    assert offending("api", allowed) == {}


def test_the_ray_package_uses_the_hosts_through_the_protocol_and_never_the_api():
    """A replica builds its host (composition, like app.py) and serves through the door."""
    def allowed(name):
        if name.startswith("adapterserve.api"):
            return False
        return (name in ("adapterserve.hosting",) or not name.startswith("adapterserve.hosting")
                or name.startswith((*HOSTING_DOOR, "adapterserve.hosting.builder")))

    assert offending("rayserve", allowed) == {}


def test_hosting_registry_and_tenants_raise_domain_errors_and_know_no_http():
    """Statuses are the API's (api/errors.py maps the domain errors in one table)."""
    for folder in ("hosting", "registry", "tenants"):
        for path in modules_under(folder):
            names = imports_of(path)
            # (engine.py hands vLLM's serving objects the `State` they are made with: no HTTP)
            http = {n for n in names if n.startswith(("fastapi", "starlette", "adapterserve.api"))}
            assert http <= {"starlette.datastructures", "starlette.datastructures.State"}, path
            assert "APIError" not in path.read_text(), path


def host_getattrs(path: Path) -> list[str]:
    """`getattr(<something named host>, ...)` calls: reaching past the protocol."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            if "host" in target.split(".")[-1]:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_hosting_reaches_past_the_host_protocol():
    users = [hit for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] != "hosting" for hit in host_getattrs(path)]
    assert users == []


def test_the_getattr_rule_catches_a_reach_past_the_protocol(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(request):\n    return getattr(request.app.state.host, 'quarantined', {})\n")
    assert len(host_getattrs(sample)) == 1


def test_the_host_protocol_is_complete_for_every_host():
    """Every member the protocol declares exists on every host; nothing else is used."""
    from adapterserve.hosting.dedicated import DedicatedHost
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.rayserve.replica_set import ReplicaSetHost

    declared = protocol_members(protocol.Host)
    for host in (SharedBaseHost, DedicatedHost, ReplicaSetHost):
        instance_only = {"settings", "created", "registry", "base_name", "fine_tuning_base", "base_path", "weights_path", "lora_rank", "observer", "pinned", "restarts"}
        missing = sorted(m for m in declared - instance_only if not hasattr(host, m))
        assert missing == [], host.__name__


def test_only_hosting_and_the_metrics_import_the_engine_plugins_and_they_import_nothing_else():
    """engine_plugins/ runs inside vLLM's processes: hosting installs it, the metrics read
    what it reports; it imports nothing of adapterserve outside itself but two leaves (the
cache folder's default, the CPU's identity)."""
    leaves = ("adapterserve.engine_plugins", "adapterserve.config", "adapterserve.dtypes")
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0]
        names = {n for n in imports_of(path) if n.startswith("adapterserve.")}
        if top == "engine_plugins":
            assert {n for n in names if not n.startswith(leaves)} == set(), path
        elif top not in ("hosting", "metrics"):
            assert not {n for n in names if n.startswith("adapterserve.engine_plugins")}, path


# A module over this many lines must say in its docstring why it is one piece ("Kept as
# one module: ..." one cohesive algorithm, one schema); the limit has some slack over the
# ~300 the layout aims at.
MAX_MODULE_LINES = 330


def test_modules_stay_small_or_say_why_not():
    big = []
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_MODULE_LINES and "Kept as one module:" not in docstring:
            big.append(f"{path.relative_to(PACKAGE)}: {lines}")
    assert big == []


def test_metrics_use_the_hosts_only_through_the_protocol():
    def allowed(name):
        if name.startswith(("adapterserve.training", "adapterserve.api", "adapterserve.compare")):
            return False
        return not name.startswith("adapterserve.hosting") or name.startswith("adapterserve.hosting.protocol")

    assert offending("metrics", allowed) == {}


@pytest.mark.parametrize("leaf", ["errors.py", "request_context.py", "state_files.py", "registry/kinds.py"])
def test_the_leaves_import_nothing_of_adapterserve(leaf):
    assert {n for n in imports_of(PACKAGE / leaf) if n.startswith("adapterserve")} == set()


def test_the_rules_catch_a_forbidden_import(tmp_path):
    # the checker itself must see a lazy import inside a function
    module = PACKAGE / "metrics" / "collector.py"
    assert "adapterserve.hosting.protocol" in imports_of(module)
    assert "adapterserve.hosting.protocol.engine_runtime_bytes" in imports_of(module)


def test_nothing_imports_the_old_server_name():
    root = PACKAGE.parents[1]
    sources = [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")]
    users = [str(p) for p in sources if any(n == "server" or n.startswith("server.") for n in imports_of_anywhere(p))]
    assert users == []


def imports_of_anywhere(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def protocol_members(cls) -> set[str]:
    members = set(getattr(cls, "__annotations__", {}))
    members |= {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}
    return members - set(dir(object))


@pytest.mark.parametrize("implementation", [VllmEngine, FakeEngine])
def test_engines_implement_the_engine_protocol(implementation, tmp_path):
    from adapterserve.hosting.engine import EngineSpec

    spec = EngineSpec(name="e", model_path=tmp_path, served_model_name="m", runner="generate")
    engine = implementation(spec)
    missing = sorted(m for m in protocol_members(protocol.Engine) if not hasattr(engine, m))
    assert missing == []
    for name in ("start", "stop_async", "check_health"):
        assert inspect.iscoroutinefunction(getattr(engine, name)), name


def test_ray_is_imported_only_by_the_ray_serve_composition():
    """Ray is an optional extra: only `rayserve/` (and the CLI's --ray, lazily) import it,
    and nothing but the CLI imports `rayserve/`."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        names = imports_of(path)
        if relative.parts[0] not in ("rayserve", "cli.py"):
            assert not {n for n in names if n == "ray" or n.startswith("ray.")}, relative
            assert not {n for n in names if n.startswith("adapterserve.rayserve")}, relative
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    top_level = {alias.name for node in cli.body if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert "ray" not in top_level
