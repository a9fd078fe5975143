"""The continuous-batching scheduler in process: determinism, prefix cache, policies."""

import asyncio
import dataclasses

import pytest

from condgen.bundle import read_examples, read_manifest
from condgen.server.engine import Engine
from condgen.server.requests import GeneratedRecord, GenerationSpec
from condgen.server.sampling import SamplingSettings
from condgen.server.scheduler import Scheduler, SchedulerConfig


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine(bundle, read_manifest(bundle))


def spec(intent, n, seed, **kw):
    return GenerationSpec(
        intents=(intent,),
        num_records=n,
        sampling=SamplingSettings(temperature=1.0),
        seed=seed,
        max_new_tokens=40,
        num_prompt_examples=4,
        sequences_per_round=3,
        allow_training_copies=True,
        avoid_recent_duplicates=False,
        **kw,
    )


async def run_all(engine, bundle, specs, config=SchedulerConfig()):
    async with Scheduler(engine, read_examples(bundle), ",", config).running() as scheduler:
        results = await asyncio.gather(*[scheduler.collect(s) for s in specs])
        stats = scheduler.stats()
    return results, stats


def test_same_seed_same_records_whatever_shares_the_batch(engine, bundle):
    target = spec("card_arrival", 5, seed=42)
    [(alone, _)], _ = asyncio.run(run_all(engine, bundle, [target]))
    crowd = [
        spec("exchange_rate", 6, seed=1),
        target,
        spec("lost_or_stolen_card", 4, seed=2),
        spec("card_arrival", 3, seed=3),
    ]
    results, stats = asyncio.run(run_all(engine, bundle, crowd))
    assert results[1][0] == alone
    assert stats["steps"] > 0


def test_prefix_cache_keeps_the_prompts_that_recur(engine, bundle):
    # 6 examples per intent. 4 per prompt: a drawn subset, shared within a pass by an identical
    # request but not kept, since it recurs only by chance.
    drawn = [spec("exchange_rate", 2, seed=9), spec("exchange_rate", 2, seed=9)]
    results, stats = asyncio.run(run_all(engine, bundle, drawn))
    assert results[0][0] == results[1][0]
    assert stats["prefix_cache"]["hits"] >= 1 and stats["prefix_cache"]["entries"] == 0
    # 8 per prompt: every example, so every round of the intent has the same prompt: kept, and
    # the rounds after the first take their prefill from the cache.
    whole = GenerationSpec(
        intents=("exchange_rate",),
        num_records=12,
        sampling=SamplingSettings(temperature=1.0),
        seed=3,
        max_new_tokens=24,
        num_prompt_examples=8,
        sequences_per_round=2,
        allow_training_copies=True,
        avoid_recent_duplicates=False,
    )
    [(_, summary)], stats = asyncio.run(run_all(engine, bundle, [whole]))
    cache = stats["prefix_cache"]
    assert summary.rounds >= 2 and cache["entries"] == 1
    assert cache["misses"] == 1 and cache["hits"] == summary.rounds - 1


def test_static_policy_finishes_every_request(engine, bundle):
    specs = [spec("card_arrival", 2, seed=i) for i in range(4)] + [spec("exchange_rate", 6, seed=7)]
    results, stats = asyncio.run(run_all(engine, bundle, specs, SchedulerConfig(max_batch_size=6, policy="static")))
    assert [len(records) for records, _ in results] == [2, 2, 2, 2, 6]
    assert all(summary.complete for _, summary in results)
    assert stats["policy"] == "static" and stats["running_sequences"] == 0


def test_round_budget_ends_an_impossible_request(engine, bundle):
    # Greedy decoding recites its prompt and repeats itself, so new records run out; the budget ends it.
    impossible = GenerationSpec(
        intents=("card_arrival",),
        num_records=50,
        sampling=SamplingSettings(temperature=0.0),
        seed=0,
        max_new_tokens=30,
        num_prompt_examples=6,
        sequences_per_round=2,
        max_rounds=3,
        allow_training_copies=True,
        avoid_recent_duplicates=False,
    )
    [(records, summary)], _ = asyncio.run(run_all(engine, bundle, [impossible]))
    assert summary.rounds == 3 and not summary.complete
    assert summary.incomplete_intents == ["card_arrival"] and len(records) < 50
    assert summary.rejected["duplicate"] + summary.rejected["prompt_echo"] > 0  # it recites


def test_token_budget_holds_rounds_back_and_keeps_the_records(engine, bundle):
    """A KV budget too small for two rounds runs them one at a time; the cache never outgrows
    the rows' reserved lengths; each request gets the records it gets without a budget.
    Greedy: the two runs batch rows differently, which moves logits by float rounding (~1e-6;
    padding and row order differ), enough to flip a rare sampled draw but not an argmax."""
    greedy = SamplingSettings(temperature=0.0)
    specs = [
        dataclasses.replace(spec(intent, n, seed=seed), sampling=greedy)
        for intent, n, seed in (("card_arrival", 4, 11), ("exchange_rate", 4, 12), ("lost_or_stolen_card", 3, 13))
    ]
    unbounded, _ = asyncio.run(run_all(engine, bundle, specs))
    steps = []

    async def run_bounded():
        scheduler = Scheduler(
            engine,
            read_examples(bundle),
            ",",
            SchedulerConfig(max_batch_tokens=1),
            on_step=lambda phase, rows, seconds: steps.append((phase, rows, scheduler.stats())),
        )
        task = asyncio.create_task(scheduler.run())

        async def collect(s):
            return [item async for item in scheduler.submit(s) if isinstance(item, GeneratedRecord)]

        results = await asyncio.gather(*[collect(s) for s in specs])
        scheduler.stop()
        await task
        return results

    bounded = asyncio.run(run_bounded())
    assert bounded == [records for records, _ in unbounded] and all(bounded)
    decode = [(rows, stats) for phase, rows, stats in steps if phase == "decode"]
    assert decode and max(rows for rows, _ in decode) <= 3  # one 3-row round at a time
    assert all(stats["batch_tokens"] <= stats["reserved_batch_tokens"] for _, stats in decode)


def test_a_cache_held_on_the_device_gives_the_host_records(whole_cache_bundle):
    """IO binding (the GPU's mode; here OrtValues on the CPU): prefills, forks, joins, leaves and
    the prefix cache move the cache on the device, and a crowd of seeded requests gets exactly
    the records it gets with the cache on the host."""
    from condgen.server.engine import EngineConfig

    manifest = read_manifest(whole_cache_bundle)
    crowd = [spec("exchange_rate", 4, seed=1), spec("card_arrival", 5, seed=42), spec("card_arrival", 3, seed=3)]
    by_mode = {}
    for mode in ("off", "on"):
        engine = Engine(whole_cache_bundle, manifest, EngineConfig(io_binding=mode))
        results, _ = asyncio.run(run_all(engine, whole_cache_bundle, crowd))
        by_mode[mode] = [records for records, _ in results]
        if mode == "on":
            assert engine.moves is not None and engine.moves.passes > 0
    assert by_mode["on"] == by_mode["off"]
    assert all(by_mode["on"])


def test_a_ragged_cache_gives_the_records_of_the_padded_one(bundle, append_bundle):
    """Ragged attention (right-padded rows written in place): prefills, forks, joins, leaves and
    the prefix cache give a crowd of seeded requests the records of the left-padded engine."""
    crowd = [spec("exchange_rate", 4, seed=1), spec("card_arrival", 5, seed=42), spec("card_arrival", 3, seed=3)]
    by_bundle = []
    for chosen in (append_bundle, bundle):
        results, _ = asyncio.run(run_all(Engine(chosen, read_manifest(chosen)), chosen, crowd))
        by_bundle.append([records for records, _ in results])
    assert by_bundle[0] == by_bundle[1] and all(by_bundle[1])
