"""The scheduler over the fake engine: determinism, policies, budgets, cancellation, faults,
request examples and the label check, in seconds and without a model (`make test-fast`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math

import pytest
from conftest import FAKE_EXAMPLES
from fake_engine import FakeEngine

from condgen.bundle import read_manifest
from condgen.server.errors import Overloaded, ShuttingDown
from condgen.server.requests import GeneratedRecord, GenerationSpec
from condgen.server.sampling import SamplingSettings
from condgen.server.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.fast
FAKE_INTENTS = tuple(FAKE_EXAMPLES)


def spec(intent, n, seed, **kw) -> GenerationSpec:
    settings = dict(
        intents=(intent,) if isinstance(intent, str) else tuple(intent),
        num_records=n,
        seed=seed,
        sampling=SamplingSettings(temperature=1.0),
        max_new_tokens=30,
        num_prompt_examples=2,
        sequences_per_round=3,
        avoid_recent_duplicates=False,
    )
    settings.update(kw)
    return GenerationSpec(**settings)


def run(bundle, specs, config=SchedulerConfig(), engine=None):
    """Every spec's (records, summary or error) and the scheduler's stats at the end."""
    engine = engine or FakeEngine(read_manifest(bundle))

    async def main():
        async with Scheduler.for_bundle(bundle, config, engine=engine) as scheduler:

            async def one(s):
                try:
                    return await scheduler.collect(s)
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    return [], exc

            results = await asyncio.gather(*[one(s) for s in specs])
            return results, scheduler.stats(), scheduler.totals()

    return asyncio.run(main())


def texts(records):
    return [(r.intent, r.text) for r in records]


def test_records_arrive_with_a_summary(fake_bundle_dir):
    [(records, summary)], stats, totals = run(fake_bundle_dir, [spec(["card_arrival", "exchange_rate"], 4, 1)])
    assert summary.complete and summary.records_accepted == 8
    assert sorted({r.intent for r in records}) == ["card_arrival", "exchange_rate"]
    assert all(isinstance(r, GeneratedRecord) and r.text for r in records)
    assert totals["records_accepted"] == 8 and stats["steps"] > 0 and stats["running_sequences"] == 0


def test_same_seed_same_records_whatever_shares_the_batch(fake_bundle_dir):
    target = spec("card_arrival", 5, seed=42)
    [(alone, _)], _, _ = run(fake_bundle_dir, [target])
    crowd = [spec("exchange_rate", 6, 1), target, spec("lost_or_stolen_card", 4, 2), spec("card_arrival", 3, 3)]
    results, _, _ = run(fake_bundle_dir, crowd, SchedulerConfig(max_batch_size=7))
    assert texts(results[1][0]) == texts(alone)


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_both_policies_finish_every_request(fake_bundle_dir, policy):
    specs = [spec("card_arrival", 4, s) for s in range(5)]
    results, stats, _ = run(fake_bundle_dir, specs, SchedulerConfig(max_batch_size=6, policy=policy))
    assert all(summary.complete for _, summary in results)
    assert stats["policy"] == policy


def test_a_round_larger_than_the_token_budget_runs_alone(fake_bundle_dir):
    results, _, _ = run(
        fake_bundle_dir, [spec("card_arrival", 3, 1), spec("exchange_rate", 3, 2)], SchedulerConfig(max_batch_tokens=1)
    )
    assert all(summary.complete for _, summary in results)


def test_a_request_beyond_the_active_limit_is_refused(fake_bundle_dir):
    async def main():
        async with Scheduler.for_bundle(
            fake_bundle_dir, SchedulerConfig(max_active_requests=1), engine=FakeEngine(read_manifest(fake_bundle_dir))
        ) as scheduler:
            first = scheduler.submit(spec("card_arrival", 2, 1))
            with pytest.raises(Overloaded):
                scheduler.submit(spec("card_arrival", 2, 2))
            return [item async for item in first]

    assert asyncio.run(main())


def test_a_stopped_scheduler_refuses_new_requests(fake_bundle_dir):
    async def main():
        async with Scheduler.for_bundle(fake_bundle_dir, engine=FakeEngine(read_manifest(fake_bundle_dir))) as s:
            s.stop()
            with pytest.raises(ShuttingDown):
                s.submit(spec("card_arrival", 2, 1))

    asyncio.run(main())


def test_cancel_ends_a_request_without_a_summary(fake_bundle_dir):
    async def main():
        async with Scheduler.for_bundle(fake_bundle_dir, engine=FakeEngine(read_manifest(fake_bundle_dir))) as s:
            handle = s.submit(spec("card_arrival", 500, 1))
            other = asyncio.create_task(s.collect(spec("exchange_rate", 3, 2)))
            received = []
            async for item in handle:
                received.append(item)
                handle.cancel()
            return received, await other

    received, (records, summary) = asyncio.run(main())
    assert len(received) < 500 and all(isinstance(r, GeneratedRecord) for r in received)
    assert summary.complete and len(records) == 3


def test_an_engine_failure_fails_the_batch_and_the_loop_goes_on(fake_bundle_dir):
    engine = FakeEngine(read_manifest(fake_bundle_dir), fail_after_steps=3)
    [(_, error)], _, _ = run(fake_bundle_dir, [spec("card_arrival", 50, 1)], engine=engine)
    assert isinstance(error, RuntimeError) and "injected" in str(error)
    engine.fail_after_steps = None
    [(records, summary)], _, _ = run(fake_bundle_dir, [spec("card_arrival", 2, 1)], engine=engine)
    assert summary.complete and len(records) == 2


def test_supplied_examples_make_a_new_intent_and_are_never_copied(fake_bundle_dir):
    supplied = {"crypto_purchase": ("buy crypto with my card", "can i buy bitcoin", "purchase crypto today")}
    [(records, summary)], _, _ = run(fake_bundle_dir, [spec("crypto_purchase", 6, 3, examples=supplied)])
    assert summary.complete and {r.intent for r in records} == {"crypto_purchase"}
    assert not {r.text for r in records} & set(supplied["crypto_purchase"])


def test_the_label_check_scores_against_supplied_rivals(fake_bundle_dir):
    supplied = {"crypto_purchase": ("buy crypto with my card", "can i buy bitcoin", "purchase crypto today")}
    both = ("crypto_purchase", "exchange_rate")
    [(records, summary)], _, _ = run(fake_bundle_dir, [spec(both, 4, 5, examples=supplied, label_check=True)])
    assert summary.complete
    # exchange_rate lines have a rival (the supplied intent); crypto_purchase ones none (no classifier here)
    assert all(r.label_margin >= 0 for r in records if r.intent == "exchange_rate")
    assert all(math.isnan(r.label_margin) for r in records if r.intent == "crypto_purchase")
    strict = spec(both, 2, 5, examples=supplied, label_check=True, label_margin=100.0, max_rounds=2)
    [(kept, summary)], _, _ = run(fake_bundle_dir, [strict])
    assert {r.intent for r in kept} == {"crypto_purchase"}  # nothing to compare with: not checked
    assert summary.rejected["label_check"] > 0 and summary.incomplete_intents == ["exchange_rate"]


def test_rival_examples_keep_a_complete_intent_as_a_rival_of_the_label_check(fake_bundle_dir):
    """A resumed call asks only for exchange_rate; crypto_purchase, complete, comes as a rival:
    exchange_rate lines are still compared with it, as in the first call."""
    supplied = {"crypto_purchase": ("buy crypto with my card", "can i buy bitcoin", "purchase crypto today")}
    resumed = spec("exchange_rate", 3, 5, rival_examples=supplied, label_check=True)
    [(records, summary)], _, _ = run(fake_bundle_dir, [resumed])
    assert summary.complete and {r.intent for r in records} == {"exchange_rate"}
    assert all(r.label_margin >= 0 for r in records)  # checked against the rival, not NaN
    alone = spec("exchange_rate", 3, 5, label_check=True)
    [(unchecked, _)], _, _ = run(fake_bundle_dir, [alone])
    assert all(math.isnan(r.label_margin) for r in unchecked)  # no classifier here: no rival without it


def test_same_seed_same_records_under_the_label_check(fake_bundle_dir):
    supplied = {"crypto_purchase": ("buy crypto with my card", "can i buy bitcoin")}
    target = spec(("crypto_purchase", "card_arrival"), 3, 7, examples=supplied, label_check=True)
    [(alone, _)], _, _ = run(fake_bundle_dir, [target])
    [(_, _), (crowded, _)], _, _ = run(fake_bundle_dir, [spec("exchange_rate", 5, 1), target])
    assert texts(crowded) == texts(alone)


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec("card_arrival", 1, 1).num_records = 2  # type: ignore[misc]


def test_automatic_batch_limits_follow_the_device():
    auto = SchedulerConfig()
    cpu = auto.for_device("cpu", cache_bytes_per_token=23_040, free_bytes=None)
    assert (cpu.max_batch_size, cpu.max_batch_tokens) == (32, 0)  # the CPU: 32 rows, no KV budget
    gpu = auto.for_device("cuda", cache_bytes_per_token=23_040, free_bytes=100 * 2**30)
    assert gpu.max_batch_size == 256
    # 60% of 100 GiB for a cache held twice in a step (in and out), 23,040 bytes a token
    assert gpu.max_batch_tokens == int(0.6 * 100 * 2**30 / (2 * 23_040))
    chosen = SchedulerConfig(max_batch_size=64, max_batch_tokens=4096).for_device("cuda", 23_040, 2**30)
    assert (chosen.max_batch_size, chosen.max_batch_tokens) == (64, 4096)  # what a user sets stays
    unread = auto.for_device("cuda", 23_040, None)  # free memory could not be read: no budget
    assert (unread.max_batch_size, unread.max_batch_tokens) == (256, 0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch_size=-1)


# ---- admission, fairness, drain and shutdown (issue 29) ---------------------------------------


def test_stop_fails_the_queued_requests_at_once_and_lets_started_ones_finish(fake_bundle_dir):
    """One request runs (the batch holds 3 rows); the other waits. `stop` fails the waiting one
    with ShuttingDown at once, not when the running one is done."""

    async def main():
        config = SchedulerConfig(max_batch_size=3)
        async with Scheduler.for_bundle(
            fake_bundle_dir, config, engine=FakeEngine(read_manifest(fake_bundle_dir))
        ) as s:
            running = asyncio.create_task(s.collect(spec("card_arrival", 40, 1)))
            while not s.sequences:
                await asyncio.sleep(0.001)
            queued = asyncio.create_task(s.collect(spec("exchange_rate", 3, 2)))
            await asyncio.sleep(0.01)
            s.stop()
            await asyncio.sleep(0)  # the queued request's outbox is already failed
            assert queued.done() and isinstance(queued.exception(), ShuttingDown)
            assert not running.done()
            return await running

    records, summary = asyncio.run(main())
    assert len(records) == summary.records_accepted > 0


def test_a_wide_round_is_not_starved_by_later_narrow_ones(fake_bundle_dir):
    """A 6-row round waits for 6 free rows; 2-row rounds that arrive after it must not take
    rows first, or it waits while they keep the batch busy."""

    async def main():
        config = SchedulerConfig(max_batch_size=6)
        async with Scheduler.for_bundle(
            fake_bundle_dir, config, engine=FakeEngine(read_manifest(fake_bundle_dir))
        ) as s:
            first = asyncio.create_task(s.collect(spec("card_arrival", 4, 1, sequences_per_round=2)))
            while not s.sequences:
                await asyncio.sleep(0.001)
            states = {}
            wide = s.submit(spec("exchange_rate", 6, 2, sequences_per_round=6))
            states["wide"] = wide._state
            narrow = [s.submit(spec("lost_or_stolen_card", 2, 3 + n, sequences_per_round=2)) for n in range(3)]
            states.update({f"narrow{n}": h._state for n, h in enumerate(narrow)})

            async def drain(handle):
                return [item async for item in handle]

            await asyncio.gather(first, drain(wide), *[drain(h) for h in narrow])
            return states

    states = asyncio.run(main())
    starts = {name: state.first_round_at for name, state in states.items()}
    assert all(starts["wide"] <= start for name, start in starts.items() if name != "wide")


def test_requests_past_their_deadline_are_refused_at_once_with_a_retry_after(fake_bundle_dir):
    """With 1 row/s assumed, a 10 s deadline admits about 8 rows owed ahead (80% of 10 s); beyond
    that, requests are refused as they arrive. Requests without a deadline still queue, and
    every admitted one finishes."""
    from condgen.server.admission import AdmissionConfig

    config = SchedulerConfig(max_batch_size=3, admission=AdmissionConfig(prior_rows_per_second=1.0))

    async def main():
        engine = FakeEngine(read_manifest(fake_bundle_dir))
        async with Scheduler.for_bundle(fake_bundle_dir, config, engine=engine) as s:
            admitted, refused = [], []
            for n in range(6):
                try:
                    admitted.append(s.submit(spec("card_arrival", 3, n), time_left=10.0))
                except Overloaded as exc:
                    refused.append(exc)
            no_deadline = s.submit(spec("exchange_rate", 3, 9))

            async def drain(handle):
                return [item async for item in handle]

            results = await asyncio.gather(*[drain(h) for h in admitted + [no_deadline]])
            return admitted, refused, results

    admitted, refused, results = asyncio.run(main())
    # 0 owed: admitted; 3: 6 s; 6: 9 s > 8 s allowed: refused, and so is everything after it
    assert len(admitted) == 2 and len(refused) == 4
    assert all(exc.retry_after is not None and exc.retry_after > 0 for exc in refused)
    assert "deadline" in str(refused[0])
    assert all(sum(isinstance(i, GeneratedRecord) for i in items) == 3 for items in results)


def test_the_row_rate_replaces_the_prior_once_measured():
    from condgen.server.admission import Admission, AdmissionConfig

    admission = Admission(AdmissionConfig(prior_rows_per_second=1.0, window_seconds=2.0))
    admission.rate.observe(10, 1.0)  # half a window: not yet a measurement
    assert admission.rows_per_second == 1.0
    admission.rate.observe(10, 1.0)
    assert admission.rows_per_second == 10.0
    admission.rate.observe(40, 2.0)
    assert admission.rows_per_second == 15.0  # half weight to the newest window (20 rows/s)
    admission.check(rows_ahead=100, own_rows=10, time_left=None)  # no deadline: always queued
    admission.check(rows_ahead=0, own_rows=10_000, time_left=1.0)  # idle: starts at once
    admission.check(rows_ahead=100, own_rows=20, time_left=10.0)  # 8 s of 8 allowed
    with pytest.raises(Overloaded) as refused:
        admission.check(rows_ahead=100, own_rows=21, time_left=10.0)
    # the same caller, waiting h: 121/15 - h <= 0.8 (10 - h) from h = (121/15 - 8) / 0.2 on
    assert refused.value.retry_after == pytest.approx((121 / 15 - 8) / 0.2)
    for _ in range(6):  # windows in which nothing passed its checks: the rate keeps a floor
        admission.rate.observe(0, 2.0)
    assert admission.rows_per_second == 0.25


def test_concurrent_requests_never_get_the_same_text_under_the_label_check(fake_bundle_dir):
    """Two identical requests that avoid the server's recent output: their lines wait for the
    label check together; each text goes to one of them only."""
    same = spec("card_arrival", 6, 4, label_check=True, avoid_recent_duplicates=True)
    (first, _), (second, _) = run(fake_bundle_dir, [same, same])[0]
    assert len(first) == len(second) == 6
    assert not {r.text for r in first} & {r.text for r in second}


def test_lines_parsed_is_accepted_plus_rejected(fake_bundle_dir):
    """Under the label check many lines of a round wait while the intent fills up; those no
    longer wanted are not counted as parsed."""
    specs = [spec(intent, 2, seed, sequences_per_round=6, label_check=True) for seed, intent in enumerate(FAKE_INTENTS)]
    results, _, totals = run(fake_bundle_dir, specs)
    for _, summary in results:
        assert summary.lines_parsed == summary.records_accepted + sum(summary.rejected.values())
    assert totals["lines_parsed"] == totals["records_accepted"] + sum(totals["rejected"].values())


def test_a_cancelled_loop_waits_for_the_running_pass_before_touching_the_batch(fake_bundle_dir):
    """The server cancels the scheduler task at shutdown; the pass in the engine thread goes on.
    The loop's cleanup (dropping the rows of unfinished requests) must wait for it."""
    import threading

    events: list[str] = []

    class SlowEngine(FakeEngine):
        def __init__(self, manifest):
            super().__init__(manifest)
            self.entered, self.release = threading.Event(), threading.Event()

        def step(self, batch, temperatures):
            self.entered.set()
            self.release.wait(10)
            events.append("pass done")
            return super().step(batch, temperatures)

    engine = SlowEngine(read_manifest(fake_bundle_dir))

    async def main():
        scheduler = Scheduler.build(fake_bundle_dir, engine=engine)
        original = scheduler._finish
        scheduler._finish = lambda state, error=None: (events.append("finish"), original(state, error))[1]
        task = asyncio.create_task(scheduler.run())
        scheduler.submit(spec("card_arrival", 50, 1))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 10)
        threading.Timer(0.3, engine.release.set).start()  # from another thread: the loop may be blocked
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert events[:2] == ["pass done", "finish"]


def test_the_loop_ends_when_the_last_request_retires_after_stop(fake_bundle_dir):
    """`stop` while a request is in flight: once it is done, the loop ends by itself (it used to
    wait for a wake-up that never came, and only a cancel ended it)."""

    async def main():
        engine = FakeEngine(read_manifest(fake_bundle_dir))
        async with Scheduler.for_bundle(fake_bundle_dir, engine=engine) as s:
            request = asyncio.create_task(s.collect(spec("card_arrival", 3, 1)))
            while not s.sequences:
                await asyncio.sleep(0.001)
            s.stop()
            return await request

    records, summary = asyncio.run(asyncio.wait_for(main(), 20))
    assert summary.complete and len(records) == 3


def test_recent_output_forgets_the_least_recent_intents():
    from condgen.server.records import RecentOutput

    recent = RecentOutput(per_intent=2, intents=3)
    for n in range(5):
        recent.add(f"new_intent_{n}", "same text")
    recent.add("new_intent_2", "a second text")  # written to again: the most recent now
    recent.add("new_intent_5", "text")
    assert len(recent) == 3
    assert ("new_intent_2", "same text") in recent and ("new_intent_5", "text") in recent
    assert ("new_intent_0", "same text") not in recent and ("new_intent_3", "same text") not in recent
    for text in ("a", "b", "c"):
        recent.add("new_intent_5", text)
    assert ("new_intent_5", "a") not in recent and ("new_intent_5", "c") in recent
