"""The package's architecture as tests: imports flow one way between concern folders, no import cycles,
every collective goes through dschat/runtime/dist.py (which moves tensors to the communication device),
DeepSpeed's ZeRO-3 gathers stay in runtime/ and algos/ is pure math."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "dschat"
# Lower layers never import higher ones: runtime -> data -> models -> algos -> rewards -> trainers -> cli.
LAYERS = ["runtime", "data", "models", "algos", "rewards", "trainers", "cli"]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "reduce_scatter",
               "all_to_all", "barrier", "gather", "scatter", "broadcast_object_list", "all_gather_into_tensor"}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    """dschat modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dschat")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dschat"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # "from dschat.x import module"
    known = modules()
    return {m for m in found if m in known}


def layer(module: str) -> int | None:
    """Index of a module's concern folder in LAYERS (None for the package root)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_concern_folder():
    stray = [m for m in modules() if m != "dschat" and layer(m) is None]
    assert not stray, f"modules outside {LAYERS}: {stray}"


def test_imports_never_run_back_up():
    upward = []
    for name, path in modules().items():
        for target in imports_of(path):
            if layer(name) is not None and layer(target) is not None and layer(target) > layer(name):
                upward.append(f"{name} imports {target}")
    assert not upward, "imports against runtime -> data -> models -> algos -> trainers -> cli:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {name: imports_of(path) - {name} for name, path in modules().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_runtime_dist_calls_collectives():
    offenders = []
    for name, path in modules().items():
        if name == "dschat.runtime.dist":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.startswith("torch.distributed") for n in names):
                    offenders.append(f"{name} imports torch.distributed")
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and \
                    isinstance(node.value, ast.Name) and node.value.id in ("tdist", "torch_dist"):
                offenders.append(f"{name} calls {node.value.id}.{node.attr}")
    assert not offenders, offenders


def dotted(node: ast.AST) -> str:
    """"a.b.c" for a chain of attribute accesses on a name ("" for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_deepspeed_gathers_only_in_runtime():
    """ZeRO-3 gathers are collectives too: deepspeed.zero is used in runtime/ only (dist.gathered is the door)."""
    offenders = []
    for name, path in modules().items():
        if layer(name) == LAYERS.index("runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.startswith("deepspeed.zero") for a in node.names):
                offenders.append(f"{name} imports deepspeed.zero")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed") and \
                    ((node.module or "").startswith("deepspeed.zero") or any(a.name == "zero" for a in node.names)):
                offenders.append(f"{name} imports from {node.module}")
            elif isinstance(node, ast.Attribute) and dotted(node).startswith("deepspeed.zero"):
                offenders.append(f"{name} uses {dotted(node)}")
    assert not offenders, offenders


def test_algos_are_pure_math():
    """algos/ runs no collective and reaches no process group or DeepSpeed: callers pass reductions in."""
    offenders = []
    for name, path in modules().items():
        if layer(name) != LAYERS.index("algos"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                bad = [n for n in names if n.startswith(("torch.distributed", "deepspeed", "dschat.runtime.dist"))]
                if isinstance(node, ast.ImportFrom) and node.module == "dschat.runtime" and \
                        any(a.name == "dist" for a in node.names):
                    bad.append("dschat.runtime.dist")
                offenders += [f"{name} imports {n}" for n in bad]
    assert not offenders, offenders


def test_gathered_is_a_no_op_without_zero3_partitions():
    from dschat.runtime import dist

    layer = torch.nn.Linear(2, 2)
    with dist.gathered(layer.parameters(), modifier_rank=0):
        layer.weight.data.fill_(1.0)  # plain parameters are whole already: changes stay
    assert torch.equal(layer.weight.data, torch.ones(2, 2))


def test_collectives_get_tensors_on_the_communication_device(monkeypatch):
    """A fake device-bound backend (as NCCL is): every tensor reaching a collective came from dist.to_comm."""
    from dschat.algos.masked import masked_whiten
    from dschat.runtime import dist
    from dschat.trainers.loop import NanGuard

    prepared: set[int] = set()
    real_to_comm = dist.to_comm

    def to_comm(t):
        out = real_to_comm(t)
        prepared.add(id(out))
        return out

    seen = []

    def fake_all_reduce(t, op=None, group=None):
        seen.append(t)
        assert id(t) in prepared, "a collective got a tensor that was not moved to the communication device"
        t.mul_(2)  # as if a second rank held the same values

    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "to_comm", to_comm)
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist.tdist, "all_reduce", fake_all_reduce)
    x, mask = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[1, 1, 0]])
    out = masked_whiten(x, mask, reduce_sum=dist.all_reduce_sum)
    assert NanGuard(3).ok(torch.tensor(1.0))
    total = dist.all_reduce_sum(torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert total.tolist() == [3.0, 4.0] and total.dtype == torch.float64
    assert len(seen) >= 4 and out.shape == x.shape


def test_communication_device_follows_the_backend(monkeypatch):
    from dschat.runtime import dist

    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *a: "gloo")
    assert dist.comm_device() == torch.device("cpu")
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *a: "nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the rank's own device (bound at set-up), not whichever is current
    assert dist.comm_device() == torch.device("cuda", 1)


def test_interrupt_message_suggests_resume_only_with_a_checkpoint(tmp_path):
    from dschat.cli.entry import resume_hint

    assert resume_hint(["--output_dir", str(tmp_path)]) == ""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step4")
    assert "--resume" in resume_hint(["--output_dir", str(tmp_path)])
    assert "--resume" in resume_hint([f"--output_dir={tmp_path}"]) and resume_hint([]) == ""
