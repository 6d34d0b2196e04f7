"""PNG plots of a comparison (matplotlib, headless): latency CDFs, goodput vs load, batch size
and KV usage over time. Inputs are plain dicts/RunResults so replay results plot the same way."""
from __future__ import annotations

from pathlib import Path

from dynabatch.bench.metrics import Outcome, RunResult


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, title: str, path) -> None:
    """Title, tight layout, PNG at 110 dpi, and the figure closed (every plot here ends so)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def latency_cdfs(runs: dict[str, RunResult], path: Path, title: str,
                 ttft_target_s: float, tpot_target_s: float) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        done = [r for r in run.records if r.outcome is Outcome.OK]
        for ax, values in ((axes[0], [r.ttft * 1000 for r in done]),
                           (axes[1], [r.tpot * 1000 for r in done if r.output_tokens > 1])):
            v = sorted(values)
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label)
    for ax, name, target in ((axes[0], "TTFT (ms)", ttft_target_s), (axes[1], "TPOT (ms)", tpot_target_s)):
        ax.axvline(target * 1000, color="grey", ls="--", lw=1, label="SLA target")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(pyplot().NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel("share of completed requests")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    save(fig, title, path)
    return path


def goodput_vs_load(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """``curves``: policy -> summaries (with target_rps), e.g. the capacity probes + grid."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["target_rps"])
        x = [p["target_rps"] for p in pts]
        axes[0].plot(x, [p["goodput_rps"] for p in pts], marker="o", ms=3, label=label)
        axes[1].plot(x, [100 * p["sla_attainment"] for p in pts], marker="o", ms=3, label=label)
    lim = max((p["target_rps"] for pts in curves.values() for p in pts), default=1)
    axes[0].plot([0, lim], [0, lim], color="grey", ls=":", lw=1, label="offered")
    axes[0].set_ylabel("goodput (SLA-meeting req/s)")
    axes[1].axhline(99, color="grey", ls="--", lw=1)
    axes[1].set_ylabel("SLA attainment (%)")
    for ax in axes:
        ax.set_xlabel("offered load (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, title, path)
    return path


def _binned(samples: list, value, bins: int = 150) -> tuple[list[float], list[float]]:
    """Mean of value(sample) per time bin (raw feedback every 0.25 s is unreadable)."""
    if not samples:
        return [], []
    t0, t1 = samples[0].t, samples[-1].t
    width = max((t1 - t0) / bins, 1e-9)
    sums, counts = [0.0] * (bins + 1), [0] * (bins + 1)
    for s in samples:
        i = int((s.t - t0) / width)
        sums[i] += value(s)
        counts[i] += 1
    xs = [t0 + (i + 0.5) * width for i in range(bins + 1) if counts[i]]
    return xs, [sums[i] / counts[i] for i in range(bins + 1) if counts[i]]


def timelines(runs: dict[str, RunResult], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    metrics = ((lambda s: s.running, "running batch"), (lambda s: 100 * s.kv_used, "KV blocks used (%)"),
               (lambda s: s.waiting, "scheduler queue"))
    for label, run in runs.items():
        for ax, (value, _) in zip(axes, metrics):
            ax.plot(*_binned(run.timeline, value), lw=1, label=label)
    for ax, (_, name) in zip(axes, metrics):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("time (s); each point: mean over 1/150 of the run")
    axes[0].legend(fontsize=8, ncol=min(len(runs), 5))
    save(fig, title, path)
    return path
