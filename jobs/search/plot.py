"""results.png: perplexity against linear-layer MiB, every trial on a log scale beside a close-up of
the trials near the budget (where the choice is made; a pruned seed a hundred times worse would
otherwise flatten them all onto the budget line)."""
from __future__ import annotations

from pathlib import Path

from jobs.bench.report import png_figure

NEAR = 1.08  # the close-up reaches this far above the budget's perplexity


def plot(rows: list[dict], baseline: dict, limit: float, path: Path, title: str) -> None:
    """Finished trials coloured by decode tok/s at batch 1 (grey: not measured), the front ringed and
    joined, stopped trials as small dots (their perplexity so far), seeds named where they stand apart."""
    near = near_budget(rows, baseline, limit)
    with png_figure(path, (13, 5.5), ncols=2) as (fig, (overview, closeup)):
        draw(overview, rows, baseline, limit, label_seed=lambda r: not inside(r, near))
        overview.set_yscale("log")
        overview.set_title("every trial (log scale)", fontsize=9)
        dots = draw(closeup, rows, baseline, limit, label_seed=lambda r: inside(r, near))
        closeup.set_xlim(*near[0])
        closeup.set_ylim(*near[1])
        closeup.set_title(f"near the budget (perplexity up to {NEAR:g}x its limit)", fontsize=9)
        if dots is not None:
            fig.colorbar(dots, ax=closeup, label="decode tok/s, batch 1")
        fig.suptitle(title)


def near_budget(rows: list[dict], baseline: dict, limit: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """((x low, x high), (y low, y high)) framing the finished trials with perplexity up to NEAR x the
    limit (a stopped trial's perplexity so far, over its first windows only, may be anywhere)."""
    top = limit * NEAR
    points = [r for r in rows if r["status"] == "complete" and r["ppl"] is not None and r["ppl"] <= top
              and r["linear_MiB"] is not None]
    sizes = [r["linear_MiB"] for r in points] or [baseline["linear_bytes"] / 2**20]
    bottom = min([r["ppl"] for r in points] + [baseline["ppl"]])
    pad_x, pad_y = 0.05 * (max(sizes) - min(sizes) or max(sizes)), 0.05 * (top - bottom)
    return (min(sizes) - pad_x, max(sizes) + pad_x), (bottom - pad_y, top)


def inside(row: dict, window: tuple[tuple[float, float], tuple[float, float]]) -> bool:
    (x0, x1), (y0, y1) = window
    return row["ppl"] is not None and x0 <= row["linear_MiB"] <= x1 and y0 <= row["ppl"] <= y1


def draw(ax, rows: list[dict], baseline: dict, limit: float, label_seed):
    """One panel; returns the scatter coloured by speed (None when no trial was measured)."""
    complete = [r for r in rows if r["status"] == "complete" and r["ppl"] is not None]
    stopped = [r for r in rows if r["status"] == "stopped" and r["ppl"] is not None]
    ax.scatter([r["linear_MiB"] for r in stopped], [r["ppl"] for r in stopped], s=8, c="lightgrey",
               label="stopped early (perplexity so far)")
    unmeasured = [r for r in complete if not r.get("decode_b1")]
    ax.scatter([r["linear_MiB"] for r in unmeasured], [r["ppl"] for r in unmeasured], s=25, c="grey",
               label="finished")
    measured = [r for r in complete if r.get("decode_b1")]
    dots = ax.scatter([r["linear_MiB"] for r in measured], [r["ppl"] for r in measured], s=30,
                      c=[r["decode_b1"] for r in measured], cmap="viridis") if measured else None
    front = sorted((r for r in complete if r["on_front"]), key=lambda r: r["linear_MiB"])
    ax.step([r["linear_MiB"] for r in front], [r["ppl"] for r in front], where="post", c="black", lw=0.8)
    ax.scatter([r["linear_MiB"] for r in front], [r["ppl"] for r in front], s=90, facecolors="none",
               edgecolors="black", label="front")
    named = sorted((r for r in rows if r["seed_name"] and r["ppl"] is not None and label_seed(r)),
                   key=lambda r: r["ppl"])
    for i, r in enumerate(named):  # neighbours by perplexity named on alternate sides
        ax.annotate(r["seed_name"], (r["linear_MiB"], r["ppl"]), fontsize=7, xytext=(-6 if i % 2 else 6, 0),
                    textcoords="offset points", ha="right" if i % 2 else "left", va="center")
    ax.scatter([baseline["linear_bytes"] / 2**20], [baseline["ppl"]], marker="*", s=150, c="red", label="fp32")
    ax.axhline(limit, ls="--", c="red", lw=0.8, label="budget")
    ax.set_xlabel("linear layers, MiB")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    return dots
