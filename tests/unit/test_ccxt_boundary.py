"""The real-venue edge: ccxt is imported by one module only; a real venue refuses to start without keys;
`tsbot sim-exchange` validates its arguments; the emulator's fault grammar."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, real_venue_problems
from engine.venues.binance_emulator import FaultSpecError, parse_fault_spec
from engine.venues.binance_emulator.faults import EmulatorFaultKind, FaultPlan, Target, parse_fault

ROOT = Path(__file__).resolve().parents[2]
TSBOT = str(Path(sys.executable).with_name("tsbot"))


def test_only_the_ccxt_adapter_imports_ccxt() -> None:
    importers = []
    for package in ("engine", "protection", "storage", "tui"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(name == "ccxt" or name.startswith("ccxt.") for name in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert sorted(set(importers)) == ["engine/venues/ccxt_venue.py"]


def _venue(**env: str):  # type: ignore[no-untyped-def]
    environ = {f"TSBOT_VENUE__{key.upper()}": value for key, value in env.items()}
    return load_config(None, environ=environ, cwd=Path("/nonexistent-config-dir")).settings.venue


def test_a_real_venue_needs_both_keys_testnet_or_not() -> None:
    assert real_venue_problems(_venue()) == []  # the sim needs none
    assert real_venue_problems(_venue(kind="binanceusdm", api_key="k", api_secret="s")) == []
    [mainnet] = real_venue_problems(_venue(kind="binanceusdm", testnet="false", api_key="k"))
    assert mainnet == (
        "venue.kind 'binanceusdm' (mainnet) needs API keys: set TSBOT_VENUE__API_SECRET "
        "(or venue.api_key_file / venue.api_secret_file)"
    )
    [testnet] = real_venue_problems(_venue(kind="bybit"))
    assert "TSBOT_VENUE__API_KEY and TSBOT_VENUE__API_SECRET" in testnet
    # A base URL that is not one is refused at load, whatever the venue.
    with pytest.raises(
        ConfigError, match=r"venue\.base_url: must be a URL starting with http:// or https://"
    ):
        _venue(kind="binanceusdm", api_key="k", api_secret="s", base_url="127.0.0.1:1")


def _tsbot(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSBOT_")}
    return subprocess.run(
        [TSBOT, *args], env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_run_on_a_real_venue_without_keys_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = _tsbot(
        "run", env={"TSBOT_VENUE__KIND": "binanceusdm", "TSBOT_VENUE__TESTNET": "false"}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == (
        "tsbot: venue.kind 'binanceusdm' (mainnet) needs API keys: set TSBOT_VENUE__API_KEY and "
        "TSBOT_VENUE__API_SECRET (or venue.api_key_file / venue.api_secret_file)\n"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "tsbot: sim-exchange needs TSBOT_VENUE__API_KEY and TSBOT_VENUE__API_SECRET"),
        (
            ("--faults", "order=explode"),
            {"TSBOT_VENUE__API_KEY": "k", "TSBOT_VENUE__API_SECRET": "s"},
            "tsbot: --faults: unknown fault 'explode'",
        ),
        (
            ("--port", "70000"),
            {"TSBOT_VENUE__API_KEY": "k", "TSBOT_VENUE__API_SECRET": "s"},
            "tsbot: --port must be within 0..65535",
        ),
    ],
)
def test_sim_exchange_refuses_bad_input_in_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = _tsbot("sim-exchange", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_fault_spec_grammar() -> None:
    rules = parse_fault_spec("POST:algoOrder=timeout@0.1, positionRisk=latency:800,*=busy")
    assert [(r.target, r.fault.kind, r.probability) for r in rules] == [
        (Target("POST", "algoOrder"), EmulatorFaultKind.TIMEOUT, 0.1),
        (Target(None, "positionRisk"), EmulatorFaultKind.LATENCY, 1.0),
        (Target(None, "*"), EmulatorFaultKind.BUSY, 1.0),
    ]
    assert rules[1].fault.latency_ms == 800
    assert parse_fault_spec("") == ()
    for bad in (
        "algoOrder",
        "nowhere=busy",
        "PATCH:order=busy",  # PUT is a method the emulator serves (keep-alive of a listen key)
        "order=busy@2",
        "order=latency:x",
        "order=busy:1",
    ):
        with pytest.raises(FaultSpecError):
            parse_fault_spec(bad)


def test_forced_faults_come_before_draws_and_run_out() -> None:
    plan = FaultPlan(parse_fault_spec("order=busy@0"), seed=1)
    plan.force((Target("POST", "algoOrder"), Target("POST", "order")), parse_fault("timeout"), count=2)
    assert plan.draw("GET", "order") is None  # probability 0, and GET is not a forced target
    assert plan.draw("POST", "order").kind is EmulatorFaultKind.TIMEOUT  # type: ignore[union-attr]
    assert plan.draw("POST", "algoOrder").kind is EmulatorFaultKind.TIMEOUT  # type: ignore[union-attr]
    assert plan.draw("POST", "algoOrder") is None


async def test_rehearsal_and_production_differ_only_in_the_url() -> None:
    """F14: the emulator ran with ccxt's throttle off while real venues kept it on, so the rehearsal never
    saw the queue a real venue would. Now every ccxt setting is the same whatever the URL: ccxt's
    throttle is off everywhere (the engine paces every request itself), the same timeout, the same pool."""
    from engine.venues.binance_venue import BinanceUsdmVenue
    from engine.venues.bybit_venue import BybitLinearVenue
    from engine.venues.ccxt_venue import CcxtVenueConfig

    for kind, venue_class in (("binanceusdm", BinanceUsdmVenue), ("bybit", BybitLinearVenue)):
        production = venue_class(CcxtVenueConfig(kind=kind, api_key="k", api_secret="s", max_connections=300))
        rehearsal = venue_class(
            CcxtVenueConfig(
                kind=kind, api_key="k", api_secret="s", max_connections=300, base_url="http://127.0.0.1:9"
            )
        )
        try:
            for venue in (production, rehearsal):
                await venue.connect()
            assert production._exchange_options() == rehearsal._exchange_options()
            for venue in (production, rehearsal):
                exchange = venue._exchange
                assert exchange.enableRateLimit is False
                assert exchange.session.connector.limit == 300  # ccxt's own pool stops at 100
                assert exchange.session.connector.limit_per_host == 300
            assert production.capabilities() == rehearsal.capabilities()
        finally:
            for venue in (production, rehearsal):
                await venue.close()


def test_an_engine_call_is_timed_out_by_the_engines_own_budget_not_by_ccxts() -> None:
    """An entry whose answer came late gave up after 8 s (ccxt's fixed timeout) although the call budget
    was 10 s. ccxt's timeout is now a net behind the engine's budget, above it, whatever the budget."""
    from engine.clock import SystemClock
    from engine.engine import build_venue

    for budget in ("3", "10", "45"):
        settings = load_config(
            None,
            environ={
                "TSBOT_VENUE__KIND": "binanceusdm",
                "TSBOT_VENUE__API_KEY": "k",
                "TSBOT_VENUE__API_SECRET": "s",
                "TSBOT_PROTECTION__CALL_TIMEOUT_SECONDS": budget,
            },
            cwd=Path("/nonexistent-config-dir"),
        ).settings
        venue = build_venue(settings, SystemClock())
        assert venue._exchange.timeout > float(budget) * 1000  # type: ignore[attr-defined]
