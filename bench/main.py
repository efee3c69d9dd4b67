"""sealbox benchmarks: every number side by side with the baseline a user would compare with.

Absolute times on the machines here are noisy (2 cores, nested virtualisation), so each
benchmark measures sealbox and its baseline in the same run and reports the ratio. Budgets
(targets) are printed as PASS/MISS; a MISS does not fail the run. The exit code is non-zero
only when the harness itself failed (an exception while measuring).

Run with `bench/run` (which runs `scripts/setup` first); see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bigserver import BenchServer  # noqa: E402

from sealbox._sys import cgroups  # noqa: E402
from sealbox.egress.gateway import ResolvePin  # noqa: E402
from sealbox.egress.secrets import SecretSpec  # noqa: E402
from sealbox.engine.config import EngineConfig  # noqa: E402
from sealbox.engine.engine import Engine  # noqa: E402
from sealbox.engine.pools import PoolConfig  # noqa: E402
from sealbox.engine.spec import ExecRequest, ExecResult, SandboxSpec  # noqa: E402
from sealbox.errors import SandboxError  # noqa: E402
from sealbox.runtimes import registry  # noqa: E402
from sealbox.runtimes.microvm_snapshot import SNAPSHOT_ENV  # noqa: E402

import reach  # noqa: E402  (bench/reach.py, next to this file)

TIERS = ("namespace", "gvisor", "microvm")
BENCH_HOST = "api.bench.test"
DEBIAN_HOST = "debian.bench.test"
DEBIAN_MIRROR = Path(os.environ.get("SEALBOX_DEBIAN_MIRROR", "/var/cache/sealbox/debian-mirror"))
SECRET_VALUE = "sk-bench-real-value-0123456789"
# Absolute paths: the host's PATH may lead to another interpreter (pyenv shims here).
CPU_CMD = ["/usr/bin/python3", "-c", "sum(i*i for i in range(3*10**6))"]
SYSCALL_CMD = ["/usr/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=100000", "status=none"]
BIG_BYTES = 20 * 1024 * 1024


# ----- statistics and results ------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    """Percentile by linear interpolation (q in 0..100); with few samples p95 is near the max."""
    s = sorted(samples)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Row:
    bench: str
    tier: str
    unit: str
    samples: list[float]
    baseline_name: str
    baseline: list[float]
    target: str = ""
    status: str = ""
    note: str = ""
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return pct(self.samples, 50)

    @property
    def p95(self) -> float:
        return pct(self.samples, 95)

    @property
    def p99(self) -> float:
        return pct(self.samples, 99)

    @property
    def base_p50(self) -> float:
        return pct(self.baseline, 50)

    @property
    def ratio(self) -> float:
        """How many times slower (or bigger) than the baseline: >1 means sealbox costs more."""
        b, s = self.base_p50, self.p50
        if not b or not s or math.isnan(b) or math.isnan(s):
            return math.nan
        return b / s if self.higher_is_better else s / b

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(n=len(self.samples), p50=self.p50, p95=self.p95, p99=self.p99,
                 baseline_p50=self.base_p50, baseline_p95=pct(self.baseline, 95),
                 ratio=self.ratio)
        return d


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.errors: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.bench} [{row.tier}]: p50 {fmt(row.p50, row.unit)}, baseline "
              f"{fmt(row.base_p50, row.unit)}, x{row.ratio:.2f} {row.status}", flush=True)
        return row


def fmt(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 10 else f"{v:.1f} s"
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    if unit == "B/s":
        return f"{v / 1e6:.1f} MB/s"
    if unit == "/s":
        return f"{v:.1f}/s"
    return f"{v:g} {unit}"


def table(rows: list[Row]) -> str:
    head = ["benchmark", "tier", "n", "p50", "p95", "p99", "baseline", "baseline p50", "ratio",
            "target", "status"]
    body = [[r.bench, r.tier, str(len(r.samples)), fmt(r.p50, r.unit), fmt(r.p95, r.unit),
             fmt(r.p99, r.unit),
             r.baseline_name, fmt(r.base_p50, r.unit),
             "-" if math.isnan(r.ratio) else f"x{r.ratio:.2f}", r.target or "-",
             r.status or "-"] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(c) + " |" for c in body])


# ----- host-side helpers -----------------------------------------------------------------------
def timed_run(argv: list[str], timeout: float = 120) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout)
    dt_ = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return dt_


def pss_of(pid: int) -> int:
    """Proportional set size of PID in bytes (0 if it is gone)."""
    return smaps_total(pid, "Pss")


def smaps_total(pid: int, field: str) -> int:
    """A /proc/PID/smaps_rollup counter (Pss, Private_Dirty, ...) in bytes (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def sum_smaps(pids: set[int], *fields: str) -> float:
    """FIELDS of smaps_rollup, in bytes, summed over PIDS."""
    return float(sum(smaps_total(p, f) for p in pids for f in fields))


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cgroup_pids(sandbox_id: str) -> set[int]:
    d = (cgroups.ROOT / cgroups.GROUP / sandbox_id if cgroups.is_v2()
         else cgroups.ROOT / "memory" / cgroups.GROUP / sandbox_id)
    try:
        return {int(x) for x in (d / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def cgroup_memory(sandbox_id: str) -> int | None:
    f = (cgroups.ROOT / cgroups.GROUP / sandbox_id / "memory.current" if cgroups.is_v2()
         else cgroups.ROOT / "memory" / cgroups.GROUP / sandbox_id / "memory.usage_in_bytes")
    try:
        return int(f.read_text())
    except (OSError, ValueError):
        return None


def self_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host_info() -> dict[str, Any]:
    def out(*argv: str) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": out("git", "-C", str(ROOT), "rev-parse", "HEAD"),
        "git_dirty": dirty,
        "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
        "mem_gib": round(int(mem) / 2**20, 1), "python": platform.python_version(),
        "cgroup": "v2" if cgroups.is_v2() else "v1",
        "bwrap": out("bwrap", "--version"), "runsc": out("runsc", "--version"),
        "qemu": out("qemu-system-x86_64", "--version"), "curl": out("curl", "--version"),
        "tiers": {n: {"ok": p.ok, "auto_skip": p.auto_skip, "detail": p.detail}
                  for n, p in registry.probes().items()},
    }


# ----- the benchmarks --------------------------------------------------------------------------
@dataclass
class Settings:
    tiers: list[str]
    quick: bool
    density_caps: dict[str, int] = field(default_factory=dict)
    """--density-cap: how far the density search may go per tier (it also stops at the
    memory reserve or the first failure)."""

    def reps(self, tier: str, normal: int, quick: int, microvm: int) -> int:
        if tier == "microvm":
            return min(microvm, quick) if self.quick else microvm
        return quick if self.quick else normal


class Bench:
    def __init__(self, engine: Engine, server: BenchServer, settings: Settings,
                 report: Report) -> None:
        self.engine = engine
        self.server = server
        self.s = settings
        self.report = report
        self.cold: dict[str, list[float]] = {}
        """Cold create → first exec samples per tier (the start benchmark's), for comparisons."""
        self.cold_boot: dict[str, list[float]] = {}
        """microvm: the same without its memory-snapshot restore (a booted VM)."""

    async def _run(self, sid: str, cmd: list[str] | str, check: bool = True) -> ExecResult:
        r = await self.engine.run(sid, ExecRequest(cmd=cmd, timeout=600))
        if check and r.exit_code != 0:
            raise RuntimeError(f"{cmd!r} exited {r.exit_code} in {sid}: {r.stderr[-500:]}")
        return r

    async def _sandbox(self, tier: str, **kw: Any) -> str:
        info = await self.engine.create(SandboxSpec(runtime=tier, timeout=3600, **kw))
        return info.id

    # 1. start -> first exec
    async def start(self, tier: str) -> None:
        n = self.s.reps(tier, 10, 3, 3)
        if tier == "namespace":
            name = "bare bwrap --unshare-all true"
            argv = ["bwrap", "--ro-bind", "/", "/", "--unshare-all", "true"]
            bare: Callable[[], float] = lambda: timed_run(argv)  # noqa: E731
            target, status, note = "", "", ""
        elif tier == "gvisor":
            name = "bare runsc do /bin/true"
            gargv = ["runsc", "--platform=ptrace", "--network=none", "do", "/bin/true"]
            bare = lambda: timed_run(gargv)  # noqa: E731
            target, status, note = "< 300 ms", "", ""
        else:
            name = "bare QEMU cold boot (same kernel+initrd, first byte on agent port)"
            bare = _bare_microvm_boot
            target, status = "restore < 1 s", ""
            note = f"snapshot restore under {_microvm_accel()}"
        if tier != "microvm":  # warm the page cache and probe caches; a cold boot is too slow
            await asyncio.to_thread(bare)
        # For microvm this also builds the snapshot template (once per kernel, rootfs and size).
        sid = await self._sandbox(tier)
        await self.engine.kill(sid)
        samples, base, breakdown = await self._start_samples(tier, n, bare)
        note = "; ".join(filter(None, [note, "p50 phases: " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in breakdown.items())]))
        self.cold[tier] = samples
        if tier in ("gvisor", "microvm"):
            status = "PASS" if pct(samples, 50) < (0.3 if tier == "gvisor" else 1.0) else "MISS"
        self.report.add(Row("start → first exec", tier, "s", samples, name, base,
                            target, status, note, extra={"phases_p50": breakdown}))
        if tier == "microvm":
            os.environ[SNAPSHOT_ENV] = "0"
            try:
                samples, base, breakdown = await self._start_samples(tier, n, bare)
            finally:
                del os.environ[SNAPSHOT_ENV]
            note = f"{SNAPSHOT_ENV}=0 under {_microvm_accel()}; p50 phases: " + ", ".join(
                f"{k} {v * 1000:.0f} ms" for k, v in breakdown.items())
            self.report.add(Row("start → first exec (cold boot)", tier, "s", samples, name,
                                base, note=note, extra={"phases_p50": breakdown}))
            self.cold_boot[tier] = samples

    async def _start_samples(self, tier: str, n: int, bare: Callable[[], float]
                             ) -> tuple[list[float], list[float], dict[str, float]]:
        """N create → first exec times, each next to one of BARE, and their p50 phases."""
        samples: list[float] = []
        base: list[float] = []
        phases: dict[str, list[float]] = {}
        for _ in range(n):  # interleaved, so both see the same background noise
            base.append(await asyncio.to_thread(bare))
            with PhaseTimer(self.engine, tier) as pt:
                t0 = time.perf_counter()
                sid = await self._sandbox(tier)
                t1 = time.perf_counter()
                try:
                    await self._run(sid, ["true"])
                    samples.append(time.perf_counter() - t0)
                    pt.times["first exec"] = time.perf_counter() - t1
                finally:
                    await self.engine.kill(sid)
            for k, v in pt.times.items():
                phases.setdefault(k, []).append(v)
        return samples, base, {k: pct(v, 50) for k, v in phases.items()}

    # 2. exec round trip
    async def exec_rt(self, tier: str) -> None:
        n = self.s.reps(tier, 30, 10, 10)
        sid = await self._sandbox(tier)
        try:
            for _ in range(2):
                await self._run(sid, ["true"])
            samples, base = [], []
            for _ in range(n):
                base.append(await asyncio.to_thread(timed_run, ["true"]))
                t0 = time.perf_counter()
                await self._run(sid, ["true"])
                samples.append(time.perf_counter() - t0)
        finally:
            await self.engine.kill(sid)
        self.report.add(Row("exec round trip (true)", tier, "s", samples,
                            "host subprocess.run(['true'])", base))

    # 3. memory per idle sandbox
    async def memory(self, tier: str) -> None:
        k = {"namespace": 5, "gvisor": 3, "microvm": 1}[tier]
        if self.s.quick:
            k = min(k, 2)
        me = os.getpid()
        before_desc = descendants(me)
        pss_before = sum(pss_of(p) for p in before_desc)
        rss_before = self_rss()
        ids: list[str] = []
        try:
            for _ in range(k):
                ids.append(await self._sandbox(tier))
            for sid in ids:  # the agent answered; let it settle to idle
                await self._run(sid, ["true"])
            await asyncio.sleep(3)
            pids = (descendants(me) - before_desc)
            for sid in ids:
                pids |= cgroup_pids(sid)
            pids.discard(me)
            pss_total = sum(pss_of(p) for p in pids)
            cg = [cgroup_memory(sid) for sid in ids]
            engine_rss = self_rss() - rss_before
        finally:
            for sid in ids:
                await self.engine.kill(sid)
        del pss_before
        per_sandbox_pss = pss_total / k
        base = await asyncio.to_thread(_idle_python_pss, k)
        cg_known = [c for c in cg if c is not None]
        self.report.add(Row(
            "host memory per idle sandbox (PSS)", tier, "bytes", [per_sandbox_pss],
            "idle host python3 (the agent's interpreter)", [base],
            note=f"{k} sandboxes, {len(pids)} processes",
            extra={"k": k, "pss_total": pss_total, "processes": len(pids),
                   "cgroup_usage_per_sandbox": cg, "engine_rss_growth_total": engine_rss}))
        if cg_known:
            self.report.add(Row(
                "host memory per idle sandbox (cgroup usage)", tier, "bytes",
                [float(c) for c in cg_known], "idle host python3 PSS", [base],
                note="memory cgroup charge: processes + page cache + tmpfs + kernel memory"))

    # 4. workloads
    async def workloads(self, tier: str) -> dict[str, tuple[list[float], list[float]]]:
        """{workload: (in-sandbox samples, host samples taken alternately with them)}."""
        n = self.s.reps(tier, 5, 2, 3)
        sid = await self._sandbox(tier)
        out: dict[str, tuple[list[float], list[float]]] = {}
        try:
            for name, cmd in (("cpu", CPU_CMD), ("syscall", SYSCALL_CMD)):
                await self._run(sid, cmd)  # warm-up
                samples, host = [], []
                for _ in range(n):
                    host.append(await asyncio.to_thread(timed_run, cmd))
                    t0 = time.perf_counter()
                    await self._run(sid, cmd)
                    samples.append(time.perf_counter() - t0)
                out[name] = (samples, host)
        finally:
            await self.engine.kill(sid)
        return out

    # 5. egress gateway
    async def egress(self) -> None:
        n_req = 10 if self.s.quick else 30
        n_big = 2 if self.s.quick else 4
        n_first = 3 if self.s.quick else 8
        sid = await self._sandbox(
            "namespace", allow_net=[BENCH_HOST],
            secrets={"BENCH_KEY": SecretSpec(value=SECRET_VALUE, hosts=[BENCH_HOST])})
        port = self.server.port
        fmt_w = "%{time_connect} %{time_appconnect} %{time_total}\\n"
        try:
            url = f"https://{BENCH_HOST}/small"
            pairs = " ".join(f"-o /dev/null {url}" for _ in range(n_req))
            cmd = (f"curl -sS --fail -H \"Authorization: Bearer $BENCH_KEY\" "
                   f"-w '{fmt_w}' {pairs}")
            await self._run(sid, cmd)  # warm: gateway leaf certificate minted, caches filled
            # Each curl run opens one new connection, then reuses it.
            runs = [_parse_curl((await self._run(sid, cmd)).stdout) for _ in range(n_first)]
            inside = runs[-1]
            big_cmd = (f"curl -sS --fail -o /dev/null -w '%{{speed_download}} %{{time_total}}\\n' "
                       f"https://{BENCH_HOST}/big?bytes={BIG_BYTES}")
            inside_big = [_parse_speed((await self._run(sid, big_cmd)).stdout)
                          for _ in range(n_big)]
        finally:
            await self.engine.kill(sid)
        substituted = f"Bearer {SECRET_VALUE}" in self.server.auth_seen
        hurl = f"https://{BENCH_HOST}:{port}/small"
        # The same trust store size as inside (the system bundle plus one CA): curl parses
        # the whole bundle during each TLS set-up, which is part of its connect time.
        bundle = tempfile.NamedTemporaryFile(suffix=".pem")
        bundle.write(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
                     + Path(self.server.ca_path).read_bytes())
        bundle.flush()
        common = ["curl", "-sS", "--fail", "--resolve", f"{BENCH_HOST}:{port}:127.0.0.1",
                  "--cacert", bundle.name]
        host_cmd = [*common, "-H", f"Authorization: Bearer {SECRET_VALUE}",
                    "-w", fmt_w.replace("\\n", "\n")]
        for _ in range(n_req):
            host_cmd += ["-o", "/dev/null", hurl]
        with bundle:
            host_runs = [_parse_curl(await asyncio.to_thread(_capture, host_cmd))
                         for _ in range(n_first)]
            host = host_runs[-1]
            host_big = [_parse_speed(await asyncio.to_thread(_capture, [
                *common, "-o", "/dev/null", "-w", "%{speed_download} %{time_total}\n",
                f"https://{BENCH_HOST}:{port}/big?bytes={BIG_BYTES}"])) for _ in range(n_big)]
        note = "placeholder swapped for the real key upstream: " + ("yes" if substituted else "NO")
        self.report.add(Row(
            "egress: first HTTPS request (connect + TLS + request)", "namespace", "s",
            [r[0][2] for r in runs], "curl from host, direct", [r[0][2] for r in host_runs],
            note=note + "; a new connection per sample, both sides trusting the system bundle",
            extra={"inside_appconnect": [r[0][1] for r in runs],
                   "host_appconnect": [r[0][1] for r in host_runs]}))
        self.report.add(Row(
            "egress: HTTPS request on a reused connection", "namespace", "s",
            [t for _, _, t in inside[1:]], "curl from host, direct",
            [t for _, _, t in host[1:]], note=f"{n_req - 1} requests on one connection"))
        self.report.add(Row(
            "egress: 20 MiB HTTPS download throughput", "namespace", "B/s",
            [s for s, _ in inside_big], "curl from host, direct", [s for s, _ in host_big],
            higher_is_better=True, note="ratio = host speed / sandbox speed"))


    # 5b. preview URLs and the SSH gateway (a real server in a subprocess)
    async def reach(self, tmp: Path) -> None:
        res = await asyncio.to_thread(reach.measure, tmp, self.s.quick)
        lat, lat_base = res["latency"]
        self.report.add(Row(
            "preview URL: GET on a kept-alive connection", "namespace", "s", lat,
            "the same http.server on the host, direct", lat_base,
            note="server → sandbox address through its veth; token checked per request"))
        tput, tput_base = res["throughput"]
        self.report.add(Row(
            "preview URL: 20 MiB download throughput", "namespace", "B/s", tput,
            "the same http.server on the host, direct", tput_base, higher_is_better=True,
            note="ratio = direct speed / preview speed"))
        ssh, cli = res["ssh"]
        self.report.add(Row(
            "ssh ID@host true (OpenSSH client, new connection each)", "namespace", "s", ssh,
            "sealbox exec ID -- true (CLI, new process each)", cli))

    # 6. create -> first exec from a warm pool
    async def pool_start(self, tier: str) -> None:
        n = self.s.reps(tier, 30, 10, 5)
        size = 2
        status = await self.engine.pools.set(PoolConfig(runtime=tier, size=size))
        samples: list[float] = []
        claims: list[float] = []
        try:
            for _ in range(n):
                # Not timed: the pool refills between claims (steady state, as in service).
                await self._pool_ready(status.key, size)
                t0 = time.perf_counter()
                info = await self.engine.create(SandboxSpec(runtime=tier, timeout=3600))
                t1 = time.perf_counter()
                try:
                    await self._run(info.id, ["true"])
                    samples.append(time.perf_counter() - t0)
                    claims.append(t1 - t0)
                    if not any(e.get("kind") == "created" and e.get("pooled")
                               for e in self.engine.logs(info.id)):
                        raise RuntimeError(f"{info.id} did not come from the pool")
                finally:
                    await self.engine.kill(info.id)
        finally:
            await self.engine.pools.remove(None, tier)
        limit = {"namespace": 0.020, "gvisor": 0.050, "microvm": 0.150}[tier]
        target = f"< {limit * 1000:.0f} ms" + (" (KVM)" if tier == "microvm" else "")
        verdict = "PASS" if pct(samples, 50) < limit else "MISS"
        note = f"pool of {size}, refilled between claims; claim alone p50 {pct(claims, 50) * 1000:.1f} ms"
        if tier == "microvm" and _microvm_accel() != "KVM":
            note += f"; target is for KVM, this host runs {_microvm_accel()}"
        cold = self.cold.get(tier, [])
        self.report.add(Row("create → first exec (warm pool)", tier, "s", samples,
                            "cold create → first exec (same run)", cold, target, verdict, note,
                            extra={"claim_samples": claims, "pool_size": size}))

    # 6b. create -> first exec from a snapshot (a filesystem template on namespace/gvisor;
    # microvm's "start → first exec" row is already a memory-snapshot restore)
    async def snapshot_start(self, tier: str) -> None:
        snap = getattr(self.engine, "snapshot", None)
        if snap is None or "template" not in SandboxSpec.model_fields:
            self.report.skipped.append({"tier": tier, "why": "snapshot start: no snapshots "
                                        "in this build"})
            return
        n = self.s.reps(tier, 10, 3, 3)
        name = f"bench-snap-{tier}"
        sid = await self._sandbox(tier)
        try:
            await self._run(sid, "echo from-snapshot > /workspace/snap.txt")
            t0 = time.perf_counter()
            await snap(sid, name)
            snap_s = time.perf_counter() - t0
        finally:
            await self.engine.kill(sid)
        samples: list[float] = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                info = await self.engine.create(SandboxSpec.model_validate(
                    {"runtime": tier, "timeout": 3600, "template": name}))
                try:
                    r = await self._run(info.id, ["cat", "/workspace/snap.txt"])
                    samples.append(time.perf_counter() - t0)
                    if r.stdout != "from-snapshot\n":
                        raise RuntimeError(f"snapshot content missing: {r.stdout!r}")
                finally:
                    await self.engine.kill(info.id)
        finally:
            remove = getattr(self.engine, "remove_template", None)
            if remove is not None:
                remove(name)
        self.report.add(Row(
            "create → first exec (from a snapshot)", tier, "s", samples,
            "cold create → first exec (same run)", self.cold.get(tier, []),
            note=f"filesystem snapshot taken in {snap_s * 1000:.0f} ms (processes are not "
                 "restored on this tier); first exec reads a file from the snapshot"))

    # 6c. create -> first exec from a template on a Debian base (its own system dirs in place
    # of the host's), against a cold create on the host's dirs
    async def debian_start(self, tier: str) -> None:
        if not (DEBIAN_MIRROR / "dists" / "bookworm" / "Release").is_file():
            self.report.skipped.append({"tier": tier, "why": "Debian base: no local archive "
                                        f"at {DEBIAN_MIRROR} (scripts/debian-mirror)"})
            return
        from sealbox.engine.templates import TemplateSpec

        name = "bench-debian"
        t0 = time.perf_counter()
        info = await self.engine.build_template(TemplateSpec(
            name=name, base="debian", suite="bookworm", mirror=f"http://{DEBIAN_HOST}/",
            mirror_trusted=True))
        build_s = time.perf_counter() - t0
        samples: list[float] = []
        for _ in range(self.s.reps(tier, 10, 3, 3)):
            t0 = time.perf_counter()
            sb = await self.engine.create(SandboxSpec.model_validate(
                {"runtime": tier, "timeout": 3600, "template": name}))
            try:
                r = await self._run(sb.id, "cat /etc/debian_version")
                samples.append(time.perf_counter() - t0)
                if not r.stdout.startswith("12."):
                    raise RuntimeError(f"not the Debian base: {r.stdout!r}")
            finally:
                await self.engine.kill(sb.id)
        # A microVM with a template layer boots (the memory snapshot has no layer disk): its
        # baseline is a booted VM's start.
        boots = tier in self.cold_boot
        self.report.add(Row(
            "create → first exec (Debian-base template)", tier, "s", samples,
            "cold create → first exec, booted (same run)" if boots else
            "cold create → first exec (same run)",
            self.cold_boot[tier] if boots else self.cold.get(tier, []),
            note=f"bookworm minbase + python3 ({info.size / 1e6:.0f} MB), built in "
                 f"{build_s:.0f} s from a local archive (0 s: a cache hit)"))

    async def _pool_ready(self, key: str, size: int) -> None:
        deadline = time.monotonic() + 300
        while True:
            st = next(p for p in self.engine.pools.list() if p.key == key)
            if st.ready >= size and st.booting == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool {key} did not refill: {st}")
            await asyncio.sleep(0.02)

    # 7. sustained create rate
    async def throughput(self, tier: str) -> None:
        seconds = 10.0 if self.s.quick else 60.0
        workers = {"namespace": 4, "gvisor": 2, "microvm": 2}[tier]
        done: list[float] = []
        failures: list[str] = []
        start = time.monotonic()
        stop_at = start + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at and len(failures) < 3:
                t0 = time.perf_counter()
                try:
                    sid = await self._sandbox(tier)
                except Exception as exc:  # counted, not fatal: the rate is what is measured
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                try:
                    await self._run(sid, ["true"])
                    done.append(time.perf_counter() - t0)
                finally:
                    await self.engine.kill(sid)

        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.monotonic() - start
        rate = len(done) / elapsed
        cold = self.cold.get(tier, [])
        self.report.add(Row(
            "sandboxes created per second, sustained (create + first exec + kill)", tier, "/s",
            [rate], "1 / cold start p50, one at a time", [1 / pct(cold, 50)] if cold else [],
            higher_is_better=True,
            note=f"{len(done)} sandboxes in {elapsed:.0f} s, {workers} concurrent workers"
                 + (" (--quick: 10 s, not a minute)" if self.s.quick else "")
                 + (f"; {len(failures)} failed: {failures[0]}" if failures else ""),
            extra={"seconds": elapsed, "count": len(done), "workers": workers,
                   "latency_p50": pct(done, 50), "failures": failures}))

    # 8. density: the most concurrent idle sandboxes (capped, stopping before memory runs low)
    async def density(self, tier: str) -> None:
        cap = {"namespace": 300, "gvisor": 60, "microvm": 12}[tier]
        if self.s.quick:
            cap = {"namespace": 40, "gvisor": 10, "microvm": 3}[tier]
        cap = self.s.density_caps.get(tier, cap)
        total = mem_total()
        reserve = max(4 * 2**30, total // 5)
        workers = {"namespace": 4, "gvisor": 2, "microvm": 1}[tier]
        ids: list[str] = []
        why = f"reached the cap of the search ({cap})"
        before = mem_available()
        if before - reserve < 2**30:
            self.report.skipped.append({"tier": tier, "why": "density: too little free memory"})
            return
        t0 = time.perf_counter()
        try:
            stop = False
            while len(ids) < cap and not stop:
                if mem_available() < reserve:
                    why = f"stopped: free memory under the {reserve / 2**30:.1f} GiB reserve"
                    break
                batch = min(workers, cap - len(ids))
                results = await asyncio.gather(*(self._sandbox(tier) for _ in range(batch)),
                                               return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        why, stop = f"stopped at the first failure: {type(r).__name__}: {r}", True
                    else:
                        ids.append(r)
            fill_s = time.perf_counter() - t0
            await asyncio.sleep(3)  # idle
            alive = 0
            ended: dict[str, int] = {}
            for sid in ids:  # every one still answers (or says why it ended)
                try:
                    alive += (await self._run(sid, ["true"], check=False)).exit_code == 0
                except SandboxError:
                    reason = self.engine.get(sid).end_reason or "ended"
                    ended[reason] = ended.get(reason, 0) + 1
            if ended:
                why += "; ended while idle: " + ", ".join(f"{n} × {r}"
                                                          for r, n in ended.items())
            after = mem_available()
            cg = [c for c in (cgroup_memory(sid) for sid in ids) if c is not None]
        finally:
            sem = asyncio.Semaphore(8)

            async def kill(sid: str) -> None:
                async with sem:
                    await self.engine.kill(sid)

            await asyncio.gather(*(kill(sid) for sid in ids), return_exceptions=True)
        per = (before - after) / max(1, len(ids))
        self.report.add(Row(
            "most concurrent idle sandboxes (search capped)", tier, "sandboxes", [float(alive)],
            "cap of the search", [float(cap)], higher_is_better=True, note=why,
            extra={"created": len(ids), "alive": alive, "fill_seconds": fill_s,
                   "mem_total": total, "reserve": reserve}))
        self.report.add(Row(
            "host memory per sandbox at that density (MemAvailable drop / count)", tier, "bytes",
            [per], "memory cgroup charge per sandbox (p50)", [float(pct([float(c) for c in cg], 50))]
            if cg else [], note=f"{len(ids)} idle sandboxes; {(before - after) / 2**30:.2f} GiB "
            "in all", extra={"mem_available_before": before, "mem_available_after": after}))

    # 9. pause and resume
    async def pause_resume(self, tier: str) -> None:
        n = self.s.reps(tier, 10, 3, 3)
        sid = await self._sandbox(tier)
        pauses: list[float] = []
        resumes: list[float] = []
        firsts: list[float] = []
        held: list[int] = []
        saved: list[int] = []
        try:
            await self._run(sid, "sleep 3600 >/dev/null 2>&1 &")
            for _ in range(n):
                t0 = time.perf_counter()
                await self.engine.pause(sid)
                t1 = time.perf_counter()
                # What a paused sandbox holds: host memory (its cgroup's charge; none once
                # saved to disk) and what pause wrote to the data dir.
                held.append(cgroup_memory(sid) or 0)
                saved.append(sum(f.stat().st_size for f in self.engine.paused.dir(sid).rglob("*")
                                 if f.is_file()))
                await self.engine.resume(sid)
                t2 = time.perf_counter()
                await self._run(sid, ["true"])
                t3 = time.perf_counter()
                pauses.append(t1 - t0)
                resumes.append(t2 - t1)
                firsts.append(t3 - t1)
        finally:
            await self.engine.kill(sid)
        mib = 2**20
        self.report.add(Row(
            "pause", tier, "s", pauses, "-", [],
            note=f"engine.pause of a sandbox running a background process; while paused it "
                 f"holds {statistics.median(held) / mib:.0f} MiB of host memory and "
                 f"{statistics.median(saved) / mib:.1f} MiB on disk",
            extra={"held_memory_bytes": held, "saved_bytes": saved}))
        self.report.add(Row("resume (→ first exec)", tier, "s", firsts, "engine.resume alone",
                            resumes))

    # 10. fork
    async def fork(self, tier: str) -> None:
        """fork → first exec in the child, against a cold create → first exec of the same
        tier, in the same run. The parent runs a background process and holds 8 MiB in
        /workspace; on microvm the fork carries its memory and processes, and the parent also
        holds 128 MiB in /tmp (guest memory): how much of it the child copied (its own
        private pages after reading it all) is set against the parent's."""
        n = self.s.reps(tier, 8, 3, 3)
        sid = await self._sandbox(tier)
        forks: list[float] = []
        colds: list[float] = []
        copied: list[float] = []
        held: list[float] = []
        big = "/tmp/big" if tier == "microvm" else ""
        try:
            await self._run(sid, "head -c 8388608 /dev/urandom > /workspace/blob; "
                                 "sleep 3600 >/dev/null 2>&1 &")
            if big:
                await self._run(sid, f"head -c 128M /dev/urandom > {big}")
            for _ in range(n):
                t0 = time.perf_counter()
                child = await self.engine.fork(sid)
                await self._run(child.id, ["true"])
                forks.append(time.perf_counter() - t0)
                if big:
                    await self._run(child.id, f"cat {big} > /dev/null")
                    copied.append(sum_smaps(cgroup_pids(child.id), "Private_Dirty"))
                    held.append(sum_smaps(cgroup_pids(sid), "Private_Dirty", "Private_Clean"))
                await self.engine.kill(child.id)
                t0 = time.perf_counter()
                cold = await self._sandbox(tier)
                await self._run(cold, ["true"])
                colds.append(time.perf_counter() - t0)
                await self.engine.kill(cold)
        finally:
            await self.engine.kill(sid)
        what = "memory and processes" if tier == "microvm" else "/workspace (8 MiB)"
        self.report.add(Row("fork (→ first exec in the child)", tier, "s", forks,
                            "cold create → first exec", colds, note=f"the child gets {what}"))
        if copied:
            self.report.add(Row(
                "fork: the child's private memory after reading all of the parent's", tier,
                "bytes", copied, "the parent's private memory", held,
                note="QEMU's own (TCG cache, devices) and the pages the child wrote; the rest "
                     "of its RAM is the saved file's pages, shared"))


def mem_available() -> int:
    return _meminfo("MemAvailable")


def mem_total() -> int:
    return _meminfo("MemTotal")


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


class PhaseTimer:
    """Times the steps of `Engine.create` by wrapping, for the duration, the calls it makes
    (network namespace, gateway attach, tier start, agent connect): nothing is edited."""

    def __init__(self, engine: Engine, tier: str) -> None:
        from sealbox._sys import netns

        self.times: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        self._netns = netns
        self._engine = engine
        self._runtime = registry.lookup(tier)

    def _timed_async(self, label: str, fn: Callable[..., Awaitable[Any]],
                     after: Callable[[Any], None] | None = None) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            result = await fn(*a, **kw)
            self.times[label] = self.times.get(label, 0.0) + time.perf_counter() - t0
            if after is not None:
                after(result)
            return result
        return wrapper

    def __enter__(self) -> PhaseTimer:
        ns_create = self._netns.create

        def create(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return ns_create(*a, **kw)
            finally:
                self.times["netns"] = time.perf_counter() - t0

        self._netns.create = create
        self._undo.append(lambda: setattr(self._netns, "create", ns_create))
        gw = self._engine.gateway
        gw.attach = self._timed_async("gateway attach", gw.attach)  # type: ignore[method-assign]
        self._undo.append(lambda: gw.__dict__.pop("attach", None))
        rt: Any = self._runtime

        def wrap_connect(sb: Any) -> None:
            sb.connect = self._timed_async("agent connect", sb.connect)

        rt.start = self._timed_async("tier start", rt.start, wrap_connect)
        self._undo.append(lambda: rt.__dict__.pop("start", None))
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self._undo):
            undo()


def _capture(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv[:3])}... exited {r.returncode}: {r.stderr[-500:]}")
    return r.stdout


def _parse_curl(text: str) -> list[tuple[float, float, float]]:
    rows = [tuple(float(x) for x in line.split()) for line in text.split("\n") if line.strip()]
    if not rows:
        raise RuntimeError(f"no curl timings in {text!r}")
    return [(a, b, c) for a, b, c in rows]


def _parse_speed(text: str) -> tuple[float, float]:
    speed, total = text.split()[:2]
    return float(speed), float(total)


def _microvm_accel() -> str:
    from sealbox.runtimes import microvm

    accel = microvm._probe()[1]
    return accel.name.upper() if accel else "?"


def _bare_microvm_boot() -> float:
    """A bare QEMU boot of the same kernel and initramfs, timed to the first byte on the agent
    port: the microvm tier's own probe boot (no netns, no cgroup, no agent, no engine)."""
    from sealbox.runtimes import microvm
    from sealbox.runtimes.microvm_image import Assets
    from sealbox.runtimes.namespace import HOST_UID_BASE

    accel = microvm._probe()[1]
    assets = Assets.load()
    if accel is None or assets is None:
        raise RuntimeError("microvm tier unavailable")
    t0 = time.perf_counter()
    why = microvm._probe_boot(assets, accel, microvm.TCG_PROBE_TIMEOUT, HOST_UID_BASE)
    if why is not None:
        raise RuntimeError(f"bare microvm boot failed: {why}")
    return time.perf_counter() - t0


def _idle_python_pss(k: int) -> float:
    """PSS of one idle host python3 among K of them (sharing pages as K agents would)."""
    procs = [subprocess.Popen(["/usr/bin/python3", "-I", "-c", "import sys, time; print(flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE)
             for _ in range(k)]
    try:
        for p in procs:
            assert p.stdout is not None
            p.stdout.readline()
        time.sleep(0.5)
        return sum(pss_of(p.pid) for p in procs) / k
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ----- main ------------------------------------------------------------------------------------
async def run_all(settings: Settings, report: Report, only: set[str] | None) -> None:
    def wanted(name: str) -> bool:
        return only is None or name in only

    with tempfile.TemporaryDirectory(prefix="sealbox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = BenchServer(tmp, BENCH_HOST)
        archive = ArchiveServer(DEBIAN_MIRROR)
        engine = Engine(EngineConfig(
            data_dir=tmp / "data",
            resolve=[ResolvePin.parse(f"{BENCH_HOST}:443:127.0.0.1:{server.port}"),
                     ResolvePin.parse(f"{DEBIAN_HOST}:80:127.0.0.1:{archive.port}")],
            upstream_ca=[server.ca_path]))
        bench = Bench(engine, server, settings, report)

        async def guard(what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
            print(f"- {what}", flush=True)
            try:
                return await fn()
            except Exception as exc:  # a harness failure: recorded, the run goes on
                traceback.print_exc()
                report.errors.append({"bench": what, "error": f"{type(exc).__name__}: {exc}"})
                return None

        try:
            await engine.start()
            tiers = []
            probes = registry.probes()
            for t in settings.tiers:
                p = probes[t]
                if p.ok:
                    tiers.append(t)
                else:
                    report.skipped.append({"tier": t, "why": p.detail})
                    print(f"- skipping tier {t}: {p.detail}", flush=True)
            for t in tiers:
                if wanted("start"):
                    await guard(f"start {t}", lambda t=t: bench.start(t))
                if wanted("snapshot") and t != "microvm":
                    await guard(f"snapshot {t}", lambda t=t: bench.snapshot_start(t))
                if wanted("debian"):
                    await guard(f"debian {t}", lambda t=t: bench.debian_start(t))
                if wanted("pool"):
                    await guard(f"pool {t}", lambda t=t: bench.pool_start(t))
                if wanted("exec"):
                    await guard(f"exec {t}", lambda t=t: bench.exec_rt(t))
                if wanted("memory"):
                    await guard(f"memory {t}", lambda t=t: bench.memory(t))
                if wanted("pause"):
                    await guard(f"pause {t}", lambda t=t: bench.pause_resume(t))
                if wanted("fork"):
                    await guard(f"fork {t}", lambda t=t: bench.fork(t))
            for t in tiers:
                if wanted("throughput"):
                    await guard(f"throughput {t}", lambda t=t: bench.throughput(t))
                if wanted("density"):
                    await guard(f"density {t}", lambda t=t: bench.density(t))
            if wanted("workload"):
                await guard("workloads", lambda: workloads(bench, tiers))
            if wanted("egress") and "namespace" in tiers:
                await guard("egress", bench.egress)
            if wanted("reach") and "namespace" in tiers:
                await guard("reach", lambda: bench.reach(tmp))
        finally:
            await engine.close()
            server.close()
            archive.close()


class ArchiveServer:
    """The local Debian archive on 127.0.0.1, for the Debian-base benchmark."""

    def __init__(self, directory: Path) -> None:
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

        handler = functools.partial(Quiet, directory=str(directory))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def workloads(bench: Bench, tiers: list[str]) -> None:
    per_tier: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for t in tiers:
        try:
            per_tier[t] = await bench.workloads(t)
        except Exception as exc:
            traceback.print_exc()
            bench.report.errors.append({"bench": f"workloads {t}",
                                        "error": f"{type(exc).__name__}: {exc}"})
    labels = {"cpu": "CPU-heavy (python sum of squares, 3e6)",
              "syscall": "syscall-heavy (dd bs=1, 200k syscalls)"}
    for name in ("cpu", "syscall"):
        ns = per_tier.get("namespace", {}).get(name)
        for t, res in per_tier.items():
            samples, host = res[name]
            row = Row(labels[name], t, "s", samples, "same on the host", host)
            if ns and t != "namespace":
                # Normalised by each run's own host baseline, so noise between runs cancels.
                row.extra["ratio_to_namespace"] = row.ratio / (pct(ns[0], 50) / pct(ns[1], 50))
                row.note = f"x{row.extra['ratio_to_namespace']:.2f} vs namespace"
            bench.report.add(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--tiers", default=",".join(TIERS),
                    help="comma-separated tiers (default: all three)")
    ap.add_argument("--only", default="",
                    help="comma-separated subset of start,snapshot,debian,pool,exec,memory,"
                         "pause,fork,throughput,density,workload,egress,reach")
    ap.add_argument("--density-cap", default="",
                    help="TIER=N,… how many sandboxes the density search may create per tier "
                         "(default 300/60/12; it also stops at the memory reserve)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks.png"),
                    help="PNG chart of the headline numbers ('' = none)")
    args = ap.parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        ap.error(f"unknown tier(s) {', '.join(bad)}: choose from {', '.join(TIERS)}")
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    caps: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in args.density_cap.split(","))):
        tier, _, n = item.partition("=")
        if tier not in TIERS or not n.isdigit() or int(n) < 1:
            ap.error(f"--density-cap {item!r}: use TIER=N with TIER one of {', '.join(TIERS)}")
        caps[tier] = int(n)
    if os.geteuid() != 0:
        print("bench: must run as root (sandboxes need namespaces, cgroups and nftables)",
              file=sys.stderr)
        return 2

    settings = Settings(tiers=tiers, quick=args.quick, density_caps=caps)
    # Each sandbox holds a few descriptors in this process (agent channel, gateway sockets):
    # a long density search must not stop at the soft limit of open files.
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = Report()
    info = host_info()
    print(f"sealbox benchmarks, {info['date']}, commit {info['git_commit'][:10]}"
          f"{' (dirty)' if info['git_dirty'] else ''}, {info['cpus']} CPUs, kernel "
          f"{info['kernel']}, tiers {','.join(tiers)}{' (quick)' if args.quick else ''}",
          flush=True)
    started = time.monotonic()
    try:
        asyncio.run(run_all(settings, report, only))
    except Exception as exc:
        traceback.print_exc()
        report.errors.append({"bench": "harness", "error": f"{type(exc).__name__}: {exc}"})
    info["duration_s"] = round(time.monotonic() - started, 1)
    info["quick"] = args.quick
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": info, "results": [r.as_json() for r in report.rows],
        "skipped": report.skipped, "errors": report.errors,
        "table_markdown": table(report.rows),
    }, indent=2, default=str) + "\n")
    print()
    print(table(report.rows))
    for s in report.skipped:
        print(f"skipped tier {s['tier']}: {s['why']}")
    for e in report.errors:
        print(f"HARNESS ERROR in {e['bench']}: {e['error']}")
    if args.chart:
        try:
            from chart import draw

            draw(json.loads(out.read_text()), Path(args.chart))
            print(f"chart: {args.chart}")
        except Exception as exc:  # the numbers are written; a chart failure is reported
            traceback.print_exc()
            report.errors.append({"bench": "chart", "error": f"{type(exc).__name__}: {exc}"})
    print(f"\nresults: {out} ({info['duration_s']} s)")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
