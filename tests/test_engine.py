"""The ONNX engine against transformers: greedy tokens match, alone and in a changing batch."""

import numpy as np
import pytest

from condgen.bundle import read_manifest
from condgen.server.batch import Batch
from condgen.server.engine import Engine

STEPS = 10


@pytest.fixture(scope="module", params=["ragged", "append"])
def engine(request, bundle):
    """The engine over the default (ragged) bundle and over an append-only, left-padded one."""
    chosen = bundle if request.param == "ragged" else request.getfixturevalue("append_bundle")
    return Engine(chosen, read_manifest(chosen))


@pytest.fixture(scope="module")
def append_engine(append_bundle):
    return Engine(append_bundle, read_manifest(append_bundle))


@pytest.fixture(scope="module")
def prompts():
    return ["card_arrival,When will my card", "exchange_rate,What is the exchange rate for\nexchange_rate,"]


def transformers_greedy(checkpoint, prompt_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=STEPS, do_sample=False, pad_token_id=model.config.pad_token_id
        )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_alone_matches_transformers_generate(engine, checkpoint, prompts):
    for seq_id, prompt in enumerate(prompts):
        ids = engine.encode(prompt)
        batch = engine.new_batch(seq_id, ids)
        tokens = []
        for _ in range(STEPS):
            token = int(np.argmax(engine.forward(batch)[0]))
            tokens.append(token)
            batch.set_next([token])
        expected = transformers_greedy(checkpoint, ids)
        assert tokens[: len(expected)] == expected


def test_sequences_joining_and_leaving_a_running_batch_match(engine, checkpoint, prompts):
    ids = [engine.encode(p) for p in prompts]
    expected = [transformers_greedy(checkpoint, i) for i in ids]
    tokens = {0: [], 1: []}

    def step(batch):
        logits = engine.forward(batch)
        nxt = [int(np.argmax(row)) for row in logits]
        for seq, tok in zip(batch.seq_ids, nxt):
            tokens[seq].append(tok)
        batch.set_next(nxt)

    running = engine.new_batch(0, ids[0])
    for _ in range(3):  # sequence 0 runs alone for a while
        step(running)
    joining = engine.new_batch(1, ids[1])
    step(joining)  # prefill of sequence 1
    running = type(running).concatenate([running, joining])  # different cache lengths
    while len(tokens[0]) < STEPS:
        step(running)
    running = running.filter([1])  # sequence 0 leaves
    while len(tokens[1]) < STEPS:
        step(running)
    for seq in (0, 1):
        assert tokens[seq][: len(expected[seq])] == expected[seq]


def test_forked_prefill_gives_the_same_next_logits(engine, prompts):
    ids = engine.encode(prompts[1])
    alone = engine.new_batch(0, ids)
    reference = engine.forward(alone)[0]
    shared = engine.new_batch(1, ids)
    engine.forward(shared)
    forked = shared.fork([2, 3, 4])
    forked.set_next([5, 5, 5])
    alone.set_next([5])
    np.testing.assert_allclose(engine.forward(forked), np.repeat(engine.forward(alone), 3, axis=0), atol=1e-5)
    assert reference.shape == (engine.vocab_size,)


def test_newline_tokens_are_found(engine):
    newline = engine.encode("\n")
    assert all(engine.newline_tokens[t] for t in newline)
    assert not engine.newline_tokens[engine.encode("card")[0]]


def test_io_binding_gives_the_same_logits(whole_cache_bundle, append_engine, prompts):
    from condgen.server.engine import EngineConfig

    engine = append_engine
    bound = Engine(whole_cache_bundle, read_manifest(whole_cache_bundle), EngineConfig(io_binding="on"))
    assert bound.io_binding and not engine.io_binding and engine.append_only and not bound.append_only
    prompt = engine.encode(prompts[0])
    plain_batch, bound_batch = engine.new_batch(0, prompt), bound.new_batch(0, prompt)
    for _ in range(3):
        expected, got = engine.forward(plain_batch), bound.forward(bound_batch)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        token = int(np.argmax(expected[0]))
        plain_batch.set_next([token])
        bound_batch.set_next([token])
    # rows leave and join with the cache held as OrtValues
    other = bound.new_batch(1, bound.encode(prompts[1]))
    bound.forward(other)
    other.set_next([3])
    merged = Batch.concatenate([bound_batch, other])
    assert bound.forward(merged).shape == (2, bound.vocab_size)


def test_under_io_binding_rows_join_leave_and_fork_on_the_device(whole_cache_bundle, append_engine, prompts):
    """With the cache held as OrtValues, joins, leaves and forks run as device passes (the cache
    never becomes numpy) and give the logits of the host engine's moves."""
    from condgen.server.engine import EngineConfig

    engine = append_engine
    bound = Engine(whole_cache_bundle, read_manifest(whole_cache_bundle), EngineConfig(io_binding="on"))
    assert bound.moves is not None and engine.moves is None
    ids = [engine.encode(p) for p in prompts]

    def run(eng):
        first, second = eng.new_batch(0, ids[0]), eng.new_batch(1, ids[1])
        logits = [eng.forward(first), eng.forward(second)]
        forked = second.fork([2, 3])  # one prefill, two sequences
        first.set_next([5])
        forked.set_next([7, 9])
        joined = Batch.concatenate([first, forked])  # different lengths: left padding
        logits.append(eng.forward(joined))
        joined.set_next([11, 13, 15])
        left = joined.filter([0, 3])  # rows leave
        logits.append(eng.forward(left))
        return logits, [joined, left]

    expected, _ = run(engine)
    before = bound.moves.passes
    got, batches = run(bound)
    assert bound.moves.passes - before == 3  # fork, join, leave
    assert all(not b.on_host() for b in batches)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("io_binding", ["off", "on"])
def test_the_sampling_head_gives_the_host_windows(whole_cache_bundle, prompts, io_binding):
    """`step` with the sampling head (on the model's device; under IO binding it reads the logits
    there) gives the windows the host computes from the full logits, and the same draws."""
    from condgen.server.engine import EngineConfig
    from condgen.server.sampling import SamplingSettings, TokenWindows, sequence_rng

    manifest = read_manifest(whole_cache_bundle)
    headed = Engine(whole_cache_bundle, manifest, EngineConfig(io_binding=io_binding))
    host = Engine(whole_cache_bundle, manifest, EngineConfig(io_binding=io_binding, sampling_head="off"))
    assert headed.head is not None and host.head is None
    ids = [headed.encode(p) for p in prompts]
    a, b = headed.prompts_batch([0, 1], ids), host.prompts_batch([0, 1], ids)  # left-padded prefill
    temperatures = np.array([0.7, 1.0], dtype=np.float32)
    settings = [SamplingSettings(temperature=0.7), SamplingSettings(top_p=0.9)]
    for _ in range(3):
        got, expected = headed.step(a, temperatures), host.step(b, temperatures)
        assert isinstance(got, TokenWindows) and got.ids.shape == (2, 256)
        assert np.array_equal(got.ids[:, :20], expected.ids[:, :20])
        np.testing.assert_allclose(got.log_norm, expected.log_norm, rtol=1e-4)
        np.testing.assert_allclose(got.full_logits(), expected.full_logits(), atol=1e-5)
        tokens = [got.sample(row, settings[row], sequence_rng(3, row)) for row in range(2)]
        assert tokens == [expected.sample(row, settings[row], sequence_rng(3, row)) for row in range(2)]
        a.set_next(tokens)
        b.set_next(tokens)


def test_batched_prefill_matches_separate_prefills(engine, checkpoint, prompts):
    ids = [engine.encode(p) for p in prompts] + [engine.encode("exchange_rate,")]
    together = engine.prefill([10, 11, 12], ids, max_tokens=10_000)
    in_pairs = engine.prefill([20, 21, 22], ids, max_tokens=2 * max(len(i) for i in ids))
    for (batch, logits), (_, pair_logits), prompt in zip(together, in_pairs, ids):
        alone = engine.new_batch(0, prompt)
        np.testing.assert_allclose(logits, engine.forward(alone)[0], atol=1e-4)
        np.testing.assert_allclose(pair_logits, logits, atol=1e-4)
        assert batch.past_len == len(prompt)
    # greedy decoding from the batched prefill still equals transformers
    batch = type(together[0][0]).concatenate([b for b, _ in together[:2]])
    batch.set_next([int(np.argmax(logits)) for _, logits in together[:2]])
    tokens = [[int(np.argmax(logits))] for _, logits in together[:2]]
    for _ in range(STEPS - 1):
        nxt = np.argmax(engine.forward(batch), axis=-1)
        for row, t in enumerate(nxt):
            tokens[row].append(int(t))
        batch.set_next(nxt)
    for row in range(2):
        expected = transformers_greedy(checkpoint, ids[row])
        assert tokens[row][: len(expected)] == expected


def transformers_mean_logprob(checkpoint, context, continuation) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(context)
    return float(sum(logp[start + i - 1, t] for i, t in enumerate(continuation)) / len(continuation))


def test_score_matches_transformers_log_probabilities_in_one_padded_pass(engine, checkpoint):
    """Lines of different lengths scored together (left-padded, a window of logits) give
    the same mean log-probability as transformers on each line alone."""
    pairs = [
        ("card_arrival,", "When will my card arrive?\n"),
        ("exchange_rate,", "What is the exchange rate\n"),
        ("lost_or_stolen_card,", "I lost my card\n"),
    ]
    contexts = [engine.encode(c) for c, _ in pairs]
    continuations = [engine.encode(t) for _, t in pairs]
    scores = engine.score(contexts, continuations)
    expected = [transformers_mean_logprob(checkpoint, c, t) for c, t in zip(contexts, continuations)]
    assert scores == pytest.approx(expected, abs=1e-3)
    assert engine.score(contexts[:1], continuations[:1])[0] == pytest.approx(expected[0], abs=1e-3)


def test_scores_prefer_the_intent_a_training_text_belongs_to(engine, train_records):
    """The overfit tiny model scores a training text highest under its own intent."""
    record = next(r for r in train_records if r.intent == "lost_or_stolen_card")
    intents = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    scores = engine.score([engine.encode(f"{i},") for i in intents], [engine.encode(record.text + "\n")] * 3)
    assert intents[int(np.argmax(scores))] == "lost_or_stolen_card"


@pytest.mark.parametrize("io_binding", ["off", "on", "ragged"])
def test_scores_after_kept_contexts_match_transformers(
    append_bundle, whole_cache_bundle, bundle, checkpoint, io_binding, monkeypatch
):
    """Contexts of examples (long enough to be kept): each is run once, its lines feed only their
    own tokens after its cache, in passes mixing contexts of different lengths (under ragged
    attention one line per pass); the scores are transformers' on each whole row, and a second
    call reads the kept contexts."""
    from condgen.codec import prompt_text
    from condgen.server import engine as engine_module
    from condgen.server.engine import SHARED_CONTEXT_MIN, EngineConfig

    monkeypatch.setattr(engine_module, "SHARED_CONTEXT_MIN_RAGGED", SHARED_CONTEXT_MIN)  # these short contexts too
    chosen = {"off": append_bundle, "on": whole_cache_bundle, "ragged": bundle}[io_binding]
    engine = Engine(chosen, read_manifest(chosen), EngineConfig(io_binding="on" if io_binding == "on" else "off"))
    assert engine.ragged == (io_binding == "ragged")
    contexts = [
        engine.encode(prompt_text("card_arrival", ["When does my card come?", "Card still not here"], ",")),
        engine.encode(prompt_text("exchange_rate", ["What rate do you use for euros?"], ",")),
    ]
    assert all(len(c) >= SHARED_CONTEXT_MIN for c in contexts)
    texts = ["When will my card arrive?\n", "What is the exchange rate\n", "rate?\n"]
    pairs = [(c, engine.encode(t)) for c in contexts for t in texts] + [(engine.encode("card_arrival,"), [5, 6])]
    scores = engine.score([c for c, _ in pairs], [t for _, t in pairs], max_tokens=64)  # several passes
    expected = [transformers_mean_logprob(checkpoint, c, t) for c, t in pairs]
    assert scores == pytest.approx(expected, abs=1e-3)
    assert engine.contexts.stats()["entries"] == 2 and engine.contexts.hits == 0
    again = engine.score([c for c, _ in pairs[:3]], [t for _, t in pairs[:3]])
    assert again == pytest.approx(expected[:3], abs=1e-3)
    assert engine.contexts.hits == 1


def test_a_ragged_bundle_is_one_attention_node_per_layer(bundle):
    """The default export's graph: GroupQueryAttention in every layer, no position input (the attention
    takes positions from the lengths), the logits window a required input; parity as fp32."""
    import onnx

    from condgen.bundle import LOGITS_TO_KEEP, RAGGED_ATTENTION

    manifest = read_manifest(bundle)
    graph = onnx.load(str(bundle / manifest.onnx.file)).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == manifest.onnx.num_layers and RAGGED_ATTENTION in manifest.onnx.rewrites
    assert not any(n.op_type == "Softmax" for n in graph.node)
    assert "position_ids" not in manifest.onnx.inputs and LOGITS_TO_KEEP in manifest.onnx.inputs
    assert manifest.onnx.parity_max_abs_diff < 1e-3 and manifest.onnx.parity_greedy_match == 1.0


def test_ragged_rows_attend_over_their_own_tokens_only(bundle, prompts):
    """A short row decoded beside a long one gets the logits it gets alone (no padding between
    its tokens), and the cache buffers are written in place."""
    ragged = Engine(bundle, read_manifest(bundle))
    short, long = ragged.encode("exchange_rate,"), ragged.encode(prompts[1] + " What is the rate")
    [(a, _), (b, _)] = ragged.prefill([0, 1], [short, long])
    batch = type(a).concatenate([a, b], consume=True)
    buffer = batch.storage[ragged.info.past_key_names[0]]
    batch.set_next([7, 7])
    together = ragged.forward(batch)
    assert batch.lengths.tolist() == [len(short) + 1, len(long) + 1]
    assert batch.storage[ragged.info.past_key_names[0]] is buffer and np.abs(buffer[0, :, len(short)]).sum() > 0
    alone = ragged.new_batch(2, short)
    ragged.forward(alone)
    alone.set_next([7])
    np.testing.assert_allclose(together[0], ragged.forward(alone)[0], atol=1e-4)


def test_a_ragged_bundle_refuses_cuda_with_a_clear_error(bundle):
    """Its cache is host memory written in place by the graph: `--device cuda` says what to export."""
    from condgen.server.engine import EngineConfig, EngineError

    with pytest.raises(EngineError, match="ragged cache lives in host memory.*--variant fp16"):
        Engine(bundle, read_manifest(bundle), EngineConfig(device="cuda"))


def test_a_ragged_engine_keeps_its_cache_binding_while_the_buffers_stay(bundle, prompts):
    """Steps in a row reuse one IO binding of the cache buffers; a join (other rows, other
    buffers) binds anew, and the joined batch's logits are those of a fresh engine."""
    ragged, fresh = Engine(bundle, read_manifest(bundle)), Engine(bundle, read_manifest(bundle))
    ids = [ragged.encode(p) for p in prompts]
    [(a, _)] = ragged.prefill([0], ids[:1])
    a.set_next([7])
    ragged.forward(a)
    kept = ragged._bound[1]
    a.set_next([8])
    ragged.forward(a)
    assert ragged._bound[1] is kept
    [(b, _)] = ragged.prefill([1], ids[1:])
    joined = type(a).concatenate([a, b], consume=True)
    joined.set_next([9, 9])
    logits = ragged.forward(joined)
    assert ragged._bound[1] is not kept

    [(c, _)] = fresh.prefill([0], ids[:1])
    for token in (7, 8):
        c.set_next([token])
        fresh.forward(c)
    [(d, _)] = fresh.prefill([1], ids[1:])
    again = type(c).concatenate([c, d])
    again.set_next([9, 9])
    np.testing.assert_allclose(logits, fresh.forward(again), atol=1e-5)


def test_position_logits_end_with_the_prefills_next_token_logits(engine, prompts):
    ids = engine.encode(prompts[1])
    every = engine.position_logits(ids)
    [(_, last)] = engine.prefill([0], [ids])
    assert every.shape == (len(ids), engine.vocab_size)
    np.testing.assert_allclose(every[-1], last, atol=1e-4)
    shorter = engine.position_logits(ids[:-2])
    np.testing.assert_allclose(every[: len(ids) - 2], shorter, atol=1e-4)
