"""What a run allocates on the CPU, from torch.profiler's allocation events:
each allocation and free with the operator stack it happened in, and the
peak of what was allocated during the run. A transient that a memory model
misses shows here even when it is freed before the run returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

__all__ = ["Allocation", "allocation_events", "allocation_peak"]


class Allocation(NamedTuple):
    time_ns: int
    bytes: int  # negative: freed
    stack: list[str]  # operator names, outermost first


def allocation_events(prof: profile) -> list[Allocation]:
    """Every allocation and free a profile (with profile_memory=True) saw, in time order."""
    found = []

    def walk(node, stack):
        if node.tag == _EventType.Allocation:
            found.append(Allocation(node.start_time_ns, node.extra_fields.alloc_size, stack))
            return
        inner = stack + [node.name] if node.tag == _EventType.TorchOp else stack
        for child in node.children:
            walk(child, inner)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    return sorted(found, key=lambda a: a.time_ns)


def allocation_peak(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """Runs ``fn(*args)`` on the CPU and returns ``(result, bytes)``: the
    peak, over the run, of what it allocated and had not freed yet (frees of
    tensors allocated before the run are not seen, so they do not lower it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args)
    live = peak = 0
    for allocation in allocation_events(prof):
        live += allocation.bytes
        peak = max(peak, live)
    return result, peak
