"""Long-running behaviour (`make soak`): what each YesTLS service holds
(resident memory, open file descriptors) before and after steady mail, and
around a burst of concurrent SMTP sessions at the edge.

Measured from outside: /proc/PID/status and /proc/PID/fd of each running
`yestls*` service's main process, read with `docker exec` as root. The
oracle's signing processes (one unit per connection from the front) are
summed under one name, `yestls-signer`.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

from scenario import address, container, wait_for

HOSTS = ("edge", "home")
_MEASURE = r"""
for unit in $(systemctl list-units --plain --no-legend --state=running --type=service 'yestls*' | cut -d' ' -f1); do
  pid=$(systemctl show -p MainPID --value "$unit")
  [ "$pid" -gt 0 ] 2>/dev/null || continue
  rss=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status 2>/dev/null) || continue
  fds=$(ls /proc/$pid/fd 2>/dev/null | wc -l)
  echo "$unit $pid ${rss:-0} $fds"
done
"""


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int
    processes: int


def service_name(unit: str) -> str:
    name = unit.removesuffix(".service")
    return name.split("@", 1)[0] if "@" in name else name


def measure() -> dict[str, Usage]:
    """{service: its main processes' resident KiB and open fds}, every running yestls service on edge and home."""
    usage: dict[str, Usage] = {}
    for host in HOSTS:
        for line in container(host).check_output("sh -c %s", _MEASURE).splitlines():
            unit, _, rss, fds = line.split()
            name = f"{host}_{service_name(unit)}".replace("-", "_")
            old = usage.get(name, Usage(0, 0, 0))
            usage[name] = Usage(old.rss_kib + int(rss), old.fds + int(fds), old.processes + 1)
    return usage


def print_usage(label: str, usage: dict[str, Usage]) -> None:
    for name, u in sorted(usage.items()):
        print(f"[soak] {label}: {name}: VmRSS {u.rss_kib} KiB, {u.fds} fds, {u.processes} process(es)", flush=True)


def print_growth(before: dict[str, Usage], after: dict[str, Usage], hours: float, prefix: str = "") -> None:
    """`value rss_growth_mib_per_hour_<service> <n>` and `value fd_growth_<service> <n>` lines."""
    for name in sorted(set(before) & set(after)):
        rss = (after[name].rss_kib - before[name].rss_kib) / 1024 / max(hours, 1e-9)
        print(f"value {prefix}rss_growth_mib_per_hour_{name} {rss:.2f}")
        print(f"value {prefix}fd_growth_{name} {after[name].fds - before[name].fds}")
    for name in sorted(set(before) ^ set(after)):
        print(f"[soak] {name} ran only {'before' if name in before else 'after'}: a restart or a new process")


@dataclass
class BurstResult:
    greeted: int = 0       # 220 banners
    refused: int = 0       # another reply at the banner or to EHLO (421, 554, ...)
    failed: int = 0        # no connection, a reset, a timeout
    ehlo_ok: int = 0
    failures: Counter = field(default_factory=Counter)   # the failures' kinds
    replies: Counter = field(default_factory=Counter)    # the refusals' first reply lines


async def _session(host: str, hold: asyncio.Event, result: BurstResult, timeout: float) -> None:
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, 25), timeout)
        banner = await asyncio.wait_for(reader.readline(), timeout)
        if not banner.startswith(b"220"):
            result.refused += 1
            result.replies[banner[:60].decode(errors="replace").strip()] += 1
            return
        result.greeted += 1
        writer.write(b"EHLO burst.sender.test\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line or line[3:4] != b"-":
                break
        if line.startswith(b"250"):
            result.ehlo_ok += 1
        else:
            result.refused += 1
        await hold.wait()
        writer.write(b"QUIT\r\n")
        await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
        result.failed += 1
        result.failures[type(error).__name__] += 1
    finally:
        if writer is not None:
            writer.close()


async def _burst(host: str, sessions: int, hold_seconds: float, timeout: float, during) -> BurstResult:
    result = BurstResult()
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_session(host, hold, result, timeout)) for _ in range(sessions)]
    deadline = time.monotonic() + timeout * 2
    while result.greeted + result.refused + result.failed < sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(hold_seconds)
    await asyncio.get_running_loop().run_in_executor(None, during)
    hold.set()
    await asyncio.wait(tasks, timeout=timeout * 2)
    return result


def burst(sessions: int = 1000, hold_seconds: float = 5.0, timeout: float = 60.0, during=lambda: None) -> BurstResult:
    """`sessions` concurrent SMTP sessions from the controller to the edge's
    port 25: banner, EHLO, held until every one is answered (bounded) and
    `during()` ran, then QUIT."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < sessions + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, sessions + 1024), hard))
    return asyncio.run(_burst(address("edge"), sessions, hold_seconds, timeout, during))


def wait_for_fds_back(before: dict[str, Usage], slack: int = 16, timeout: float = 120) -> dict[str, Usage]:
    """Measure until each service's fds are back within `slack` of `before` (bounded); the last measurement."""
    last: dict[str, dict[str, Usage]] = {}

    def back() -> bool:
        last["usage"] = measure()
        return all(last["usage"].get(n, u).fds <= u.fds + slack for n, u in before.items())

    wait_for(back, timeout=timeout, interval=5)
    return last["usage"]
