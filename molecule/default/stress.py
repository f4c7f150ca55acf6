"""`make chaos` and `make soak`: the whole path under faults, and over time.

    stress.py chaos [--seed N] [--messages N] [--faults N]
    stress.py soak [--minutes N] [--per-minute N] [--sessions N]

Both run after `molecule converge` has deployed the scenario (molecule.yml)
and leave it as they found it. `chaos` sends mail from Postfix on `internet`
while faults chosen from the seed come and go (tests/chaos.py, tests/faults.py), then checks
every message arrived exactly once and nothing is left on the way; it prints
the seed first: the same seed replays the same messages and faults. `soak`
sends steady mail for a while and prints how the memory and open files of
each YesTLS service grew (tests/soak.py), then the same around a burst of
concurrent SMTP sessions at the edge. Each exits non-zero when a check failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

import chaos  # noqa: E402 - the tests' helpers, found through the path set above
import faults  # noqa: E402
import soak  # noqa: E402


def run_chaos(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"chaos seed {seed} (replay: make chaos SEED={seed} MESSAGES={args.messages})", flush=True)
    report = chaos.run(seed, args.messages, args.faults or max(len(faults.Fault), args.messages // 8),
                       settle_timeout=args.settle)
    print(report.summary())
    return 1 if report.problems else 0


def run_soak(args) -> int:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    start = time.monotonic()
    report = chaos.Report(seed, f"soak-{seed:x}-{int(time.time())}")
    count = max(1, int(args.minutes * args.per_minute))
    messages = chaos.make_messages(rng, report.run, count, max_size=1_000_000)
    before = soak.measure()
    soak.print_usage("start", before)
    for index, message in enumerate(messages):
        due = start + index * 60 / args.per_minute
        time.sleep(max(0.0, due - time.monotonic()))   # pacing the steady mail, not waiting for anything
        chaos.send_steadily(start, report, [message])
    chaos.settle(start, report, args.settle)
    chaos.check(start, report)
    after = soak.measure()
    soak.print_usage("end", after)
    hours = (time.monotonic() - start) / 3600
    soak.print_growth(before, after, hours)
    print(report.summary())

    print(f"[soak] burst: {args.sessions} concurrent SMTP sessions at the edge", flush=True)
    peak: dict = {}
    burst_before = soak.measure()
    result = soak.burst(args.sessions, during=lambda: peak.update(soak.measure()))
    soak.print_usage("burst peak", peak)
    burst_after = soak.wait_for_fds_back(burst_before)
    soak.print_usage("burst after", burst_after)
    print(f"value burst_sessions_greeted {result.greeted}")
    print(f"value burst_sessions_ehlo_ok {result.ehlo_ok}")
    print(f"value burst_sessions_refused {result.refused}")
    print(f"value burst_sessions_failed {result.failed}")
    print(f"[soak] burst: refusals {dict(result.replies)}; failures {dict(result.failures)}")
    for name in sorted(set(burst_before) & set(burst_after) & set(peak)):
        print(f"value burst_peak_fds_{name} {peak[name].fds}")
        print(f"value burst_rss_growth_mib_{name} {(burst_after[name].rss_kib - burst_before[name].rss_kib) / 1024:.2f}")
        print(f"value burst_fd_growth_{name} {burst_after[name].fds - burst_before[name].fds}")
    healthy = chaos.full_handshake()
    print(f"[soak] after the burst, a full TLS handshake at the edge: {healthy}")
    return 1 if report.problems or healthy != "ok" else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("chaos", help="mail under faults chosen from a seed")
    c.add_argument("--seed", type=int, default=None, help="replay this seed (default: a new one, printed)")
    c.add_argument("--messages", type=int, default=300)
    c.add_argument("--faults", type=int, default=0, help="default: one per 8 messages, every kind at least once")
    c.add_argument("--settle", type=float, default=900, help="seconds to wait for everything to arrive at the end")
    c.set_defaults(func=run_chaos)
    s = commands.add_parser("soak", help="steady mail, then a burst of sessions; memory and fds of each service")
    s.add_argument("--minutes", type=float, default=60)
    s.add_argument("--per-minute", type=float, default=6)
    s.add_argument("--sessions", type=int, default=1000)
    s.add_argument("--settle", type=float, default=600)
    s.set_defaults(func=run_soak)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
