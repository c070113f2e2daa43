"""The benchmark's report: tables of results, and the ratios the performance targets are stated in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.measure import BUSY_THRESHOLD, Result, quantile
from benchmarks.options import Options
from benchmarks.processes import SERVICES, echo_case


@dataclass
class BackendReport:
    backend: str
    results: list[Result] = field(default_factory=list)
    memory: dict[str, tuple[float, float]] = field(default_factory=dict)
    log_errors: int = 0
    log_problems: Counter[str] = field(default_factory=Counter)
    log_warnings: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, case: str, load: int | str | None = None) -> Result | None:
        for result in self.results:
            if result.case == case and (load is None or result.load == str(load)):
                return result
        return None

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.log_errors or any(r.errors for r in self.results))


# ---------------------------------------------------------------- the report


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _results_table(results: list[Result], processes: list[str]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.case,
                r.load,
                f"{r.throughput:,.0f}",
                f"{r.items_per_second:,.0f}" if r.items_per_call > 1 else "",
                ms(r.quantile(0.5)),
                ms(r.quantile(0.99)),
                str(sum(r.errors.values())),
                f"{r.other_share * 100:.0f}{'!' if r.busy else ''}",
                *[_cpu(r.cpu_per_call(p)) for p in processes],
            ]
        )
    headers = [
        "case",
        "load",
        "calls/s",
        "items/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "other%",
        *processes,
    ]
    return _table(headers, rows, left=1)


def _lag_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        if r.lag is None:
            continue
        lag = r.lag
        rows.append(
            [
                r.case,
                r.load,
                str(len(lag.lags)),
                ms(quantile(lag.lags, 0.5)),
                ms(quantile(lag.lags, 0.99)),
                ms(max(lag.lags) if lag.lags else None),
                "-" if lag.drained_after is None else f"{lag.drained_after:.2f}",
                f"{lag.polls / lag.poll_seconds:,.0f}" if lag.poll_seconds else "-",
                str(lag.uncredited),
            ]
        )
    headers = [
        "case",
        "load",
        "samples",
        "lag p50 ms",
        "lag p99 ms",
        "max ms",
        "backlog s",
        "polls/s",
        "uncredited",
    ]
    return _table(headers, rows)


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str
    ok: Callable[[float], bool]
    detail: str = ""
    cases: list[Result | None] = field(default_factory=list)
    """The measurements it is computed from."""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return "PASS" if self.ok(self.value) else "MISS"

    @property
    def note(self) -> str:
        busy = any(r is not None and r.busy for r in self.cases)
        return "; ".join(n for n in (self.detail, "machine busy (other%)" if busy else "") if n)


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _throughput(result: Result | None, items: bool = False) -> float | None:
    if result is None or not result.completed:
        return None
    return result.items_per_second if items else result.throughput


def _p99(values: list[float] | None) -> float | None:
    return None if values is None else quantile(values, 0.99)


def _lags(result: Result | None) -> list[float] | None:
    return result.lag.lags if result is not None and result.lag is not None else None


def ratios(report: BackendReport, options: Options) -> list[Ratio]:
    """The performance targets, each as measured in this run."""
    out: list[Ratio] = []
    echo1, echo2 = echo_case("suite", 1), echo_case("suite", 2)
    settlement = f"settlement (batch {options.batch})"
    for c in options.concurrency:
        gift, chain = report.find("SendGift spread", c), report.find(echo2, c)
        out.append(
            Ratio(
                f"SendGift spread / {echo2} @{c}",
                _div(_throughput(gift), _throughput(chain)),
                ">= 0.7",
                lambda v: v >= 0.7,
                cases=[gift, chain],
            )
        )
    for c in options.concurrency:
        balance, hop = report.find("GetBalance", c), report.find(echo1, c)
        out.append(
            Ratio(
                f"GetBalance / {echo1} @{c}",
                _div(_throughput(balance), _throughput(hop)),
                ">= 0.8",
                lambda v: v >= 0.8,
                cases=[balance, hop],
            )
        )
    for c in options.concurrency:
        credits, hop = report.find(settlement, c), report.find(echo1, c)
        out.append(
            Ratio(
                f"settlement credits/s / {echo1} calls/s @{c}",
                _div(_throughput(credits, items=True), _throughput(hop)),
                ">= 10",
                lambda v: v >= 10,
                cases=[credits, hop],
            )
        )
    for c in options.concurrency:
        hot, spread = report.find("SendGift hot", c), report.find("SendGift spread", c)
        out.append(
            Ratio(
                f"SendGift hot / spread throughput @{c}",
                _div(_throughput(hot), _throughput(spread)),
                ">= 0.9",
                lambda v: v >= 0.9,
                cases=[hot, spread],
            )
        )
    for c in options.concurrency:
        hot, spread = report.find("SendGift hot", c), report.find("SendGift spread", c)
        out.append(
            Ratio(
                f"credit lag p99 spread / hot @{c}",
                _div(_p99(_lags(spread)), _p99(_lags(hot))),
                ">= 0.9",
                lambda v: v >= 0.9,
                "hot lag at most 1.1x spread",
                cases=[hot, spread],
            )
        )
    gift = report.find("SendGift spread open-loop 50%")
    chain = report.find(f"{echo2} open-loop")
    out.append(
        Ratio(
            f"open-loop p99 SendGift / {echo2} @{gift.load if gift else '?'}",
            _div(gift.quantile(0.99) if gift else None, chain.quantile(0.99) if chain else None),
            "<= 3",
            lambda v: v <= 3,
            cases=[gift, chain],
        )
    )
    at80 = report.find("SendGift spread open-loop 80%")
    out.append(
        Ratio(
            f"credit lag p99 (s) open-loop 80% @{at80.load if at80 else '?'}",
            _p99(_lags(at80)),
            "<= 1 s",
            lambda v: v <= 1.0,
            cases=[at80],
        )
    )
    if report.memory:
        name, (_, peak) = max(report.memory.items(), key=lambda kv: kv[1][1])
        out.append(
            Ratio(f"peak RSS per service, MB (max: {name})", peak, "<= 150", lambda v: v <= 150)
        )
    return out


def render(report: BackendReport, options: Options) -> str:
    lines = [
        "",
        "=" * 100,
        f"backend: {report.backend}",
        "=" * 100,
    ]
    lines += [f"  {note}" for note in report.notes]
    lines.append(
        "  load: calls in flight (closed loop) or arrivals per second (open loop); other%: CPU "
        "that processes outside the run used meanwhile, share of all CPUs ('!' above "
        f"{BUSY_THRESHOLD:.0%}: that case's figures are unreliable); CPU columns: ms per call"
    )
    if busy := [r for r in report.results if r.busy]:
        lines.append(
            f"  WARNING: the machine was busy with other work during {len(busy)} of "
            f"{len(report.results)} cases: rerun on a quiet machine for figures to compare"
        )
    ceilings = [r for r in report.results if r.group == "ceiling"]
    suite = [r for r in report.results if r.group == "suite"]
    opened = [r for r in report.results if r.group == "open"]
    pg = ["postgres"] if report.backend == "postgres" else []
    if ceilings:
        lines += [
            "",
            "CEILINGS: echo servers, closed loop (1-hop calls reach echo B only)",
            _results_table(ceilings, ["client", "echo-a", "echo-b"]),
        ]
    if suite:
        lines += [
            "",
            "SUITE: closed loop (settlement: calls are batches; CPU per batch call)",
            _results_table(suite, ["client", *SERVICES, *pg]),
        ]
    if opened:
        lines += [
            "",
            "OPEN LOOP: Poisson arrivals at a fixed rate, latency from the scheduled arrival",
            _results_table(
                opened,
                ["client", *SERVICES, *pg, "echo-a", "echo-b"],
            ),
        ]
    lagged = [r for r in report.results if r.lag is not None]
    if lagged:
        lines += [
            "",
            f"CREDIT LAG: SendGift answer -> GetGift reads CREDITED (1 gift in {options.lag_every} "
            f"sampled, polled every {options.lag_poll_seconds * 1000:.0f} ms; backlog: window end "
            "-> the case's last gift credited)",
            _lag_table(lagged),
        ]
    if report.memory:
        lines += [
            "",
            "MEMORY (MB) per service at the end of the run",
            _table(
                ["service", "VmRSS", "VmHWM (peak)"],
                [[n, f"{rss:.0f}", f"{hwm:.0f}"] for n, (rss, hwm) in report.memory.items()],
            ),
        ]
    lines += ["", f"RATIOS ({report.backend})"]
    rows = [
        [r.name, "-" if r.value is None else f"{r.value:.2f}", r.target, r.verdict, r.note]
        for r in ratios(report, options)
    ]
    lines.append(_table(["ratio", "value", "target", "verdict", "note"], rows))
    problems = []
    for r in report.results:
        for what, count in r.errors.most_common(5):
            problems.append(f"  {r.case} @{r.load}: {count} x {what}")
    if report.log_errors:
        problems.append(f"  the services logged {report.log_errors} errors:")
        problems += [f"    {n} x {what}" for what, n in report.log_problems.most_common(10)]
    problems += [f"  {failure}" for failure in report.failures]
    if problems:
        lines += ["", "ERRORS", *problems]
    if report.log_warnings:
        lines.append(f"  (the services logged {report.log_warnings} warnings)")
    return "\n".join(lines)
