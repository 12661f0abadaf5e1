"""The bench command's report: ratios to naive, the fastest efficient
configuration against the fastest naive one, the table (text or Markdown)
and the plots of memory and step time against depth."""

from __future__ import annotations

import re
from pathlib import Path

from .bench_configs import MODES, PRECISIONS, depth_of, input_label, input_shape, layout_label, _input_of

def max_batch_lines(max_batch: dict) -> list[str]:
    """One line per model: the largest batch that runs, per mode."""
    return [f"largest batch that runs, {model}: " + ", ".join(f"{mode} {batch}" for mode, batch in per_mode.items())
            for model, per_mode in max_batch.items()]


def _same_run(a: dict, b: dict) -> bool:
    """The same model, input and precision."""
    return (a["model"] == b["model"] and a["batch"] == b["batch"] and input_label(a) == input_label(b)
            and a.get("precision", "fp32") == b.get("precision", "fp32"))


def add_ratios(rows: list[dict]) -> None:
    """Each row against naive in its precision and layout."""
    for row in rows:
        naive = next((r for r in rows if _same_run(r, row) and r.get("layout") == row.get("layout")
                      and r["mode"] == "naive" and r.get("result") == "ok"), None)
        if naive and row.get("result") == "ok":
            for key, ratio in (("memory_bytes", "memory_vs_naive"), ("step_peak_bytes", "step_peak_vs_naive"),
                               ("step_ms", "step_vs_naive")):
                if row.get(key) is not None and naive.get(key):
                    row[ratio] = row[key] / naive[key]


def _is_efficient(row: dict) -> bool:
    return MODES[row["mode"]].mode == "efficient"


def fastest_lines(rows: list[dict]) -> list[str]:
    """Per model, input and precision run in several layouts or modes: the
    fastest efficient configuration's step time over the fastest naive one's
    (naive: plain PyTorch, compiled or not)."""
    lines = []
    done = []
    for row in rows:
        if any(_same_run(row, seen) for seen in done):
            continue
        done.append(row)
        group = [r for r in rows if _same_run(r, row) and r.get("result") == "ok"]
        efficient = [r for r in group if _is_efficient(r)]
        naive = [r for r in group if MODES[r["mode"]].mode == "naive"]
        if not efficient or not naive:
            continue
        best, rival = min(efficient, key=lambda r: r["step_ms"]), min(naive, key=lambda r: r["step_ms"])
        lines.append(
            f"{row['model']} {input_label(row)} batch {row['batch']} {row.get('precision', 'fp32')}: fastest efficient "
            f"({best['mode']}, {layout_label(best)}) {best['step_ms']:.1f} ms ÷ fastest naive ({rival['mode']}, "
            f"{layout_label(rival)}) {rival['step_ms']:.1f} ms = {best['step_ms'] / rival['step_ms']:.2f}")
    return lines


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], markdown: bool = False) -> str:
    kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "memory")
    columns = ["model", "input", "batch", "mode", "precision", "layout", f"{kind} MiB", "predicted MiB", "vs naive",
               "step peak MiB", "vs naive", "step allocated MiB", "step ms (spread)", "vs naive"]
    lines = []
    for r in rows:
        run = [r["model"], input_label(r), str(r["batch"]), r["mode"], r.get("precision", "fp32"), layout_label(r)]
        if r.get("result") != "ok":
            cells = run + [r.get("result", "?")] + [""] * 7
        else:
            cells = run + [_mib(r.get("memory_bytes")),
                     _mib(r.get("predicted_bytes")), _ratio(r.get("memory_vs_naive"), 3),
                     _mib(r.get("step_peak_bytes")), _ratio(r.get("step_peak_vs_naive"), 3),
                     _mib(r.get("step_allocated_bytes")),
                     f"{r['step_ms']:.1f} ({r['step_ms_low']:.1f}-{r['step_ms_high']:.1f} {r['step_ms_spread']})",
                     _ratio(r.get("step_vs_naive"), 2)]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(c), *(len(cells[i]) for cells in lines)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 6 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*columns), "-" * (sum(widths) + 2 * len(widths))] + [fmt.format(*c) for c in lines])


def plot(rows: list[dict], env: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import builders
    from .memory import estimate_training_step, model_saved_bytes

    ok = [r for r in rows if r.get("result") == "ok"]
    # A sweep over depth (with other rows, such as the 3-D one, left to the table) or, else, every model.
    by_depth = [r for r in ok if depth_of(r["model"])]
    sweep = bool(by_depth) and len({re.sub(r"\d+[-_]", "", r["model"], count=1) for r in by_depth}) == 1
    ok = by_depth if sweep else ok
    if not ok:
        return []
    subtitle = f"{env['device']} · torch {env['torch']} · {env['date_utc'][:10]}"
    paths = []
    for metric, ylabel, name in (("memory", "MiB", "memory_vs_depth.png"), ("step", "ms per step", "step_time_vs_depth.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        series = dict.fromkeys((r["mode"], r.get("precision", "fp32"), layout_label(r)) for r in ok)
        variants = len({key[1:] for key in series})
        for key in series:
            mode = key[0] if variants == 1 else " ".join(key)
            points = [r for r in ok if (r["mode"], r.get("precision", "fp32"), layout_label(r)) == key]
            xs = [depth_of(r["model"]) if sweep else r["model"] for r in points]
            if metric == "memory":
                measured = [(x_, r["memory_bytes"] / 2**20) for x_, r in zip(xs, points) if r.get("memory_bytes")]
                if not measured:  # compiled rows on CPU: no saved-bytes figure
                    continue
                line, = ax.plot(*zip(*measured), "o", label=f"{mode} (measured)")
                if sweep and points[0].get("predicted_bytes") is not None:
                    template = points[0]["model"]
                    family = re.sub(r"-\d+-", "-{}-", template)
                    first, last = min(xs), max(xs)
                    # About a dozen depths trace the curve (each is a model built and counted).
                    unit = 6 if "bc" in family else 3
                    depths = list(range(first, last + 1, unit * max(1, (last - first) // (12 * unit))))
                    predicted = []
                    for depth in depths:
                        import torch

                        variant = MODES[key[0]]
                        with torch.device("meta"):
                            model = builders.builder(family.format(depth))(
                                mode=variant.mode, recompute_bottleneck=variant.recompute,
                                spatial_dims=_input_of(points[0])[1], in_channels=_input_of(points[0])[0])
                        shape = input_shape(points[0])
                        autocast_dtype = PRECISIONS[key[1]] and getattr(torch, PRECISIONS[key[1]])
                        predicted.append((estimate_training_step(model, shape, autocast_dtype=autocast_dtype).total
                                          if env["device_type"] == "cuda" else model_saved_bytes(model, shape)) / 2**20)
                    ax.plot(depths, predicted, "-", color=line.get_color(), alpha=0.6, label=f"{mode} (model)")
            else:
                ax.errorbar(xs, [r["step_ms"] for r in points],
                            yerr=[[r["step_ms"] - r["step_ms_low"] for r in points], [r["step_ms_high"] - r["step_ms"] for r in points]],
                            marker="o", capsize=3, label=mode)
        kind = ok[0]["memory_kind"]
        ax.set_title(("Memory: " + kind if metric == "memory" else "Training-step time") + f"\n{subtitle}", fontsize=10)
        ax.set_xlabel("depth (DenseNet-BC)" if sweep else "model")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if not sweep:
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
