"""`make soak`: steady load on one server for a while; does its memory stay flat?

Starts `condgen serve` in a child process, keeps `--streams` clients generating back to
back for `--minutes`, samples the server's resident memory every few seconds, and reports
the growth from the end of the warm-up (the first 10% of the run) to the end. Writes
bench/results/soak.json. Loopback only; the load stops by itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from condgen.bench.load import ServerProcess


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None, "no VmRSS in /proc status"
    return int(match.group(1)) / 1024


def client_loop(target: str, intents: list[str], stop: threading.Event, outcomes: Counter, index: int) -> None:
    from condgen.client import Client, GenerateError

    seed = index * 100_000
    with Client(target, timeout=300) as client:
        while not stop.is_set():
            seed += 1
            try:
                list(
                    client.generate(
                        [intents[seed % len(intents)]],
                        4,
                        seed=seed,
                        temperature=0.9,
                        max_new_tokens=48,
                        num_prompt_examples=10,
                        sequences_per_round=4,
                    )
                )
                outcomes["OK"] += 1
            except GenerateError as exc:
                outcomes[exc.code.name] += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="condgen soak", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("demo_out/bundle"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)
    from condgen.bundle import read_examples

    intents = sorted(read_examples(args.bundle))
    server = ServerProcess(args.bundle, "--device", "cpu", "--max-batch-size", "64")
    stop, outcomes, samples = threading.Event(), Counter[str](), []
    threads = [
        threading.Thread(target=client_loop, args=(server.target, intents, stop, outcomes, i), daemon=True)
        for i in range(args.streams)
    ]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            samples.append((round(elapsed, 1), rss_mb(server.process.pid)))
            print(
                f"[soak] {elapsed:6.0f} s  rss {samples[-1][1]:7.1f} MB  calls {dict(outcomes)}",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(5)
        stop.set()
        for thread in threads:
            thread.join(300)
    finally:
        server.stop()
    warm = [mb for t, mb in samples if t >= args.minutes * 6][0]
    end = samples[-1][1]
    report = {
        "minutes": args.minutes,
        "streams": args.streams,
        "calls": dict(outcomes),
        "rss_after_warmup_mb": warm,
        "rss_end_mb": end,
        "rss_peak_mb": max(mb for _, mb in samples),
        "rss_growth_pct": (end - warm) / warm * 100,
        "samples": samples,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(
        f"RSS {warm:.0f} MB after warm-up -> {end:.0f} MB at the end: {report['rss_growth_pct']:+.1f}% "
        f"({sum(outcomes.values())} calls: {dict(outcomes)}); written to {args.output}"
    )
    return 0 if report["rss_growth_pct"] < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
