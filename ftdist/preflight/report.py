"""The checklist `ftdist preflight` prints: one line per check that passed, one line per problem (each naming its
node where a node is at fault, with the fix), as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ftdist.redact import redact


@dataclass
class Check:
    name: str
    """resources, versions, storage, locations, /dev/shm, disk, memory, collective, step"""
    ok: bool
    detail: str
    node: Optional[str] = None
    """The node at fault (`ip:port (hostname)`), None for a cluster-wide result."""
    fix: Optional[str] = None
    skipped: bool = False


@dataclass
class Checklist:
    target: str
    """what was checked: the cluster address and its size"""
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, check: Check) -> None:
        self.checks.append(check)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failed


def render(cl: Checklist) -> str:
    width = max((len(c.name) for c in cl.checks), default=8)
    out = [f"ftdist preflight: {cl.target}"]
    for c in cl.checks:
        mark = "skip" if c.skipped else ("ok" if c.ok else "FAIL")
        where = f"node {c.node}: " if c.node else ""
        fix = f"; fix: {c.fix}" if c.fix and not c.ok else ""
        out.append(f"  {mark:<5}{c.name:<{width + 2}}{where}{c.detail}{fix}")
    return redact("\n".join(out))  # node errors are other programs' words: the last guard against a secret in them


def to_json(cl: Checklist) -> dict[str, Any]:
    return {"target": cl.target, "ok": cl.ok, "seconds": round(cl.seconds, 1),
            "checks": [{k: redact(v) if isinstance(v, str) else v for k, v in asdict(c).items()} for c in cl.checks]}
