"""The headline chart of a `bench/run` result: start times cold / snapshot / warm pool per tier,
sustained create rate, density, and pause/resume. matplotlib (the `bench` extra), no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TIERS = ("namespace", "gvisor", "microvm")
TARGETS_MS = {"namespace": 20.0, "gvisor": 50.0, "microvm": 150.0}


def _find(results: list[dict[str, Any]], bench: str, tier: str) -> dict[str, Any] | None:
    return next((r for r in results if r["bench"] == bench and r["tier"] == tier), None)


def draw(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[dict[str, Any]] = data["results"]
    tiers = [t for t in TIERS if any(r["tier"] == t for r in results)]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    host = data.get("host", {})
    fig.suptitle(f"sealbox bench/run — {host.get('date', '?')}, commit "
                 f"{str(host.get('git_commit', '?'))[:10]}, {host.get('cpus', '?')} CPUs"
                 f"{' (quick)' if host.get('quick') else ''}", fontsize=11)

    # 1. create -> first exec: cold, snapshot (microvm), warm pool; p50 bars, p95 whiskers.
    ax = axes[0][0]
    kinds = [("cold", "start → first exec (cold boot)"), ("snapshot", None),
             ("warm pool", "create → first exec (warm pool)")]
    width = 0.27
    for i, (label, _) in enumerate(kinds):
        xs, p50, err = [], [], []
        for j, tier in enumerate(tiers):
            if label == "cold":
                row = (_find(results, "start → first exec (cold boot)", tier) if tier == "microvm"
                       else _find(results, "start → first exec", tier))
            elif label == "snapshot":
                row = (_find(results, "start → first exec", tier) if tier == "microvm"
                       else _find(results, "create → first exec (from a snapshot)", tier))
            else:
                row = _find(results, "create → first exec (warm pool)", tier)
            if row is None or not row["samples"]:
                continue
            xs.append(j + (i - 1) * width)
            p50.append(row["p50"] * 1000)
            err.append(max(0.0, (row["p95"] - row["p50"]) * 1000))
        if xs:
            bars = ax.bar(xs, p50, width, yerr=[[0] * len(err), err], capsize=3, label=label)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in p50],
                         fontsize=7)
    for j, tier in enumerate(tiers):
        ax.hlines(TARGETS_MS[tier], j - 0.45, j + 0.45, colors="red", linestyles="dashed",
                  linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(tiers)), tiers)
    ax.set_ylabel("ms (p50, whisker to p95; log)")
    ax.set_title("create → first exec (red: warm-pool target)")
    ax.legend(fontsize=8)

    # 2. sustained create rate
    ax = axes[0][1]
    rows = [(t, _find(results, "sandboxes created per second, sustained (create + first exec "
                      "+ kill)", t)) for t in tiers]
    rows = [(t, r) for t, r in rows if r]
    bars = ax.bar([t for t, _ in rows], [r["p50"] for _, r in rows], color="tab:green")
    ax.bar_label(bars, labels=[f"{r['p50']:.1f}/s" for _, r in rows], fontsize=8)
    ax.set_ylabel("sandboxes per second")
    ax.set_title("sustained create + first exec + kill")

    # 3. density
    ax = axes[1][0]
    rows = [(t, _find(results, "most concurrent idle sandboxes (search capped)", t),
             _find(results, "host memory per sandbox at that density (MemAvailable drop / count)",
                   t)) for t in tiers]
    rows = [(t, n, m) for t, n, m in rows if n]
    bars = ax.bar([t for t, _, _ in rows], [n["p50"] for _, n, _ in rows], color="tab:purple")
    ax.bar_label(bars, labels=[
        f"{n['p50']:.0f} (cap {n['baseline_p50']:.0f})"
        + (f"\n{m['p50'] / 2**20:.0f} MiB each" if m else "") for _, n, m in rows], fontsize=8)
    ax.set_ylabel("idle sandboxes at once")
    ax.set_title("most concurrent idle sandboxes (capped search)")
    ax.margins(y=0.25)

    # 4. pause / resume
    ax = axes[1][1]
    spans: list[float] = []
    for i, (bench, label) in enumerate((("pause", "pause"),
                                        ("resume (→ first exec)", "resume → first exec"))):
        xs, ys = [], []
        for j, tier in enumerate(tiers):
            row = _find(results, bench, tier)
            if row and row["samples"]:
                xs.append(j + (i - 0.5) * 0.4)
                ys.append(row["p50"] * 1000)
        if xs:
            bars = ax.bar(xs, ys, 0.4, label=label)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in ys],
                         fontsize=8)
            spans.extend(ys)
    ax.set_xticks(range(len(tiers)), tiers)
    log = bool(spans) and min(spans) > 0 and max(spans) / min(spans) > 50
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("ms (p50" + ("; log)" if log else ")"))
    ax.set_title("pause and resume")
    ax.legend(fontsize=8)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
