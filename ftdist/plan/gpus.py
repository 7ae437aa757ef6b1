"""GPU types the planner knows, and the utilisation it assumes for each, labelled by where the number comes from.

Capacities are what `torch.cuda.get_device_properties(0).total_memory` reports on each card (a little under the
marketing figure); peaks are the vendors' dense bf16 tensor-core numbers (no sparsity). Model FLOPs utilisation
(MFU) is measured by ftdist's own runs where it says "measured" (README, GPU benchmark: a 1.10B Llama on one
H100 80GB HBM3, sequences of 2048, ZeRO-2) and carried over to other cards as an assumption where it says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ftdist.errors import SpecError

MiB = 1024 ** 2
GiB = 1024 ** 3


def size_text(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point: 11.7 MiB, 89.8 GiB."""
    for unit, scale in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int
    """bytes, as torch reports the card's total memory"""
    peak_bf16: float
    """dense bf16 FLOP/s"""
    ray_type: str
    """Ray's accelerator_type for nodes with this card"""


GPUS = {g.name: g for g in (
    Gpu("H100-80GB", 81_559 * MiB, 989e12, "H100"),
    Gpu("H200-141GB", 143_771 * MiB, 989e12, "H200"),
    Gpu("A100-80GB", 81_251 * MiB, 312e12, "A100-80G"),
    Gpu("A100-40GB", 40_536 * MiB, 312e12, "A100-40G"),
    Gpu("L40S-48GB", 46_068 * MiB, 362e12, "L40S"),
    Gpu("A10G-24GB", 23_028 * MiB, 70e12, "A10G"),
    Gpu("L4-24GB", 23_034 * MiB, 121e12, "L4"),
)}
DEFAULT_GPU = "H100-80GB"


@dataclass(frozen=True)
class Utilisation:
    mfu: float
    source: str


# ftdist bench --only gpu, one H100 80GB HBM3, 1.10B Llama, seq 2048, micro batch 8, ZeRO-2 (README, 2026-11-22).
_MEASURED_H100 = {
    ("eager", False): Utilisation(0.306, "measured: ftdist bench --only gpu, H100, eager"),
    ("compile", False): Utilisation(0.345, "measured: ftdist bench --only gpu, H100, model.compile"),
    ("liger", False): Utilisation(0.405, "measured: ftdist bench --only gpu, H100, Liger kernels"),
    ("liger", True): Utilisation(0.484, "measured: ftdist bench --only gpu, H100, Liger kernels, accumulation 4"),
}


def gpu(name: Optional[str], accelerator_type: Optional[str] = None) -> Gpu:
    """The card named by --gpu, else the one whose Ray accelerator type the job asks for, else the default."""
    if name is None and accelerator_type:
        name = next((g.name for g in GPUS.values() if g.ray_type.lower() == accelerator_type.lower()), None)
    name = name or DEFAULT_GPU
    for key, g in GPUS.items():
        if key.lower() == name.lower():
            return g
    raise SpecError(f"--gpu {name}: not a GPU type the planner knows ({', '.join(GPUS)})")


def utilisation(card: Gpu, variant: str, accumulating: bool) -> Utilisation:
    """MFU for a model variant (eager / compile / liger), with or without gradient accumulation."""
    measured = _MEASURED_H100.get((variant, accumulating)) or _MEASURED_H100[(variant, False)]
    if card.name.startswith("H100"):
        return measured
    return Utilisation(measured.mfu, f"assumed: the H100 measurement ({measured.mfu:.1%}) carried over to "
                                     f"{card.name}, not measured there")
