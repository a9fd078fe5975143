"""Sampling: greedy, top-k, top-p, per-sequence determinism, and the token window (host or
sampling head) giving the same draws as the whole vocabulary."""

import numpy as np
import onnxruntime as ort
import pytest

from condgen.server import graphs
from condgen.server.sampling import SamplingSettings, TokenWindows, sample_token, sequence_rng

pytestmark = pytest.mark.fast


def logits_with(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_greedy_takes_argmax():
    assert sample_token(np.array([0.1, 3.0, 2.0]), SamplingSettings(temperature=0.0), sequence_rng(0)) == 1


def test_greedy_ties_go_to_the_lower_id_as_argmax():
    row = np.array([0.5, 3.0, 1.0, 3.0])
    assert sample_token(row, SamplingSettings(temperature=0.0), sequence_rng(0)) == int(np.argmax(row)) == 1


def test_top_k_never_leaves_the_k_best():
    row = logits_with([0.05, 0.4, 0.3, 0.25])
    rng = sequence_rng(1)
    picks = {sample_token(row, SamplingSettings(top_k=2), rng) for _ in range(300)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    row = logits_with([0.5, 0.3, 0.15, 0.05])
    rng = sequence_rng(2)
    picks = {sample_token(row, SamplingSettings(top_p=0.75), rng) for _ in range(300)}
    assert picks == {0, 1}


def test_a_nucleus_wider_than_the_window_reads_the_whole_row():
    probs = np.full(5000, 1.0 / 5000)
    rng = sequence_rng(3)
    picks = {sample_token(np.log(probs), SamplingSettings(top_p=0.5), rng) for _ in range(400)}
    assert len(picks) > 256  # the nucleus holds 2,500 tokens, more than the window


def test_draws_in_the_tail_beyond_the_window_still_happen():
    logits = np.zeros(3000)
    logits[:10] = 4.0  # 10 likely tokens (10 e^4 = 546 of the weight), 2,990 unlikely ones
    rng = sequence_rng(5)
    picks = np.array([sample_token(logits, SamplingSettings(), rng) for _ in range(2000)])
    beyond_window = (3000 - 256) / (10 * np.exp(4.0) + 2990)  # 0.776: tokens past the first 256
    assert abs((picks >= 256).mean() - beyond_window) < 0.03


def test_sampling_follows_the_distribution():
    row = logits_with([0.7, 0.2, 0.1])
    rng = sequence_rng(4)
    counts = np.bincount([sample_token(row, SamplingSettings(), rng) for _ in range(3000)], minlength=3)
    assert np.allclose(counts / 3000, [0.7, 0.2, 0.1], atol=0.04)


def test_temperature_sharpens():
    row = np.array([1.0, 2.0])

    def share_of_second(temperature):
        rng = sequence_rng(6)
        return np.mean([sample_token(row, SamplingSettings(temperature=temperature), rng) for _ in range(2000)])

    assert share_of_second(0.5) > share_of_second(1.0) > share_of_second(2.0)


def test_same_seed_and_place_give_the_same_stream():
    row = np.random.default_rng(0).normal(size=100)
    settings = SamplingSettings(temperature=1.2, top_p=0.9, top_k=50)
    a = sequence_rng(9, 1, 2)
    b = sequence_rng(9, 1, 2)
    c = sequence_rng(9, 1, 3)
    seq_a = [sample_token(row, settings, a) for _ in range(30)]
    assert seq_a == [sample_token(row, settings, b) for _ in range(30)]
    assert seq_a != [sample_token(row, settings, c) for _ in range(30)]


@pytest.mark.parametrize(
    "settings",
    [SamplingSettings(), SamplingSettings(temperature=0.5), SamplingSettings(top_p=0.9), SamplingSettings(top_k=40)],
)
def test_a_window_draws_what_the_whole_vocabulary_draws(settings):
    """The window is a prefix of the whole ranking, so each uniform number draws the same token."""
    logits = (np.random.default_rng(1).standard_normal((4, 5000)) * 2).astype(np.float32)
    temperatures = np.full(4, settings.temperature)
    window = TokenWindows.from_logits(logits, temperatures)
    whole = TokenWindows.from_logits(logits, temperatures, width=5000)
    for row in range(4):
        a, b = sequence_rng(11, row), sequence_rng(11, row)
        assert [window.sample(row, settings, a) for _ in range(200)] == [
            whole.sample(row, settings, b) for _ in range(200)
        ]


def test_the_sampling_head_computes_the_host_window():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((3, 2, 1000)) * 3).astype(np.float32)  # (rows, positions, vocab)
    logits[1, -1, 7] = logits[1, -1, 3] = 20.0  # a tie at the top: the lower id first
    temperatures = np.array([0.5, 1.0, 1.7], dtype=np.float32)
    head = ort.InferenceSession(graphs.sampling_head(64), providers=["CPUExecutionProvider"])
    top_logits, top_ids, log_norm = head.run(None, {"logits": logits, "temperature": temperatures})
    host = TokenWindows.from_logits(logits[:, -1, :], temperatures.astype(np.float64), width=64)
    assert np.array_equal(top_ids, host.ids)
    assert top_ids[1, :2].tolist() == [3, 7]
    np.testing.assert_array_equal(top_logits, host.logits)
    np.testing.assert_allclose(log_norm, host.log_norm, rtol=1e-5)


def test_windows_from_a_kernel_settle_ties_by_id_and_fetch_the_full_logits_once():
    """A device's top-k may list equal logits in any order: ties go to the lower id (argmax's
    choice); the full logits are fetched once per step, however many draws need them."""
    fetched = []
    logits = np.zeros((1, 1000), dtype=np.float32)
    logits[0, [3, 7]] = 20.0

    def fetch():
        fetched.append(1)
        return logits

    windows = TokenWindows(
        np.array([[7, 3, 0]]),
        np.array([[20.0, 20.0, 0.0]], dtype=np.float32),
        np.array([20.0]),
        np.ones(1),
        1000,
        fetch,
    )
    assert windows.ids[0].tolist() == [3, 7, 0]
    assert windows.sample(0, SamplingSettings(temperature=0.0), sequence_rng(0)) == 3
    windows.full_logits()
    windows.full_logits()
    assert len(fetched) == 1
