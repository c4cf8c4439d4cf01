"""Replay buffer: the pure policy, and the SAME behaviour tests on the memory and Redis backends."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from contraq.buffer import (
    BufferCorruptError,
    BufferEntry,
    MemoryBuffer,
    ReplayBuffer,
    build_buffer,
    edit_distance_below,
    is_near_duplicate,
    merge_entries,
    prompt_key,
    sample_indices,
)
from redis_fixtures import redis_handle  # noqa: F401  (module-scoped real server fixture)


def levenshtein(a: list[int], b: list[int]) -> int:
    """Textbook full-matrix Levenshtein, the reference for the early-exit version."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def entry(ids: list[int], log_r: float, text: str | None = None) -> BufferEntry:
    return BufferEntry(ids, log_r, {"log_c": log_r / 2, "log_pq": -3.0}, text or f"t{ids}")


def far(i: int, n: int = 10) -> list[int]:
    """Token ids with no token in common with ``far(j)`` for j != i (never near-duplicates)."""
    return [1000 * (i + 1) + j for j in range(n)]


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_prompt_key_is_blake2b_of_int32_le_and_stable_across_processes() -> None:
    ids = [1, 2, 3, 70000, 2**31 - 1]
    expected = hashlib.blake2b(struct.pack("<5i", *ids), digest_size=16).hexdigest()
    assert prompt_key(ids) == expected
    assert prompt_key(torch.tensor(ids)) == expected
    assert prompt_key([1, 2, 4]) != expected
    code = f"from contraq.buffer import prompt_key; print(prompt_key({ids}))"
    for seed in ("1", "2"):  # Python's hash() would differ across these
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert out == expected
    with pytest.raises(ValueError, match="1-D"):
        prompt_key(torch.tensor([ids]))
    with pytest.raises(ValueError, match="empty"):
        prompt_key([])


def test_edit_distance_below_matches_levenshtein() -> None:
    rng = random.Random(0)
    for _ in range(600):
        alphabet = rng.choice([2, 4, 12])  # small alphabets: DP path; large: bag-distance path
        a = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 9))]
        b = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 9))]
        d = levenshtein(a, b)
        for limit in (0, 0.5, d, d + 0.5, d + 1, 3.7):
            assert edit_distance_below(a, b, limit) == (d < limit), (a, b, limit)


def test_near_duplicate_threshold_is_quarter_of_total_length() -> None:
    a = list(range(10))
    four = a[:6] + [90, 91, 92, 93]  # distance 4 < 0.25 * 20 = 5
    five = a[:5] + [90, 91, 92, 93, 94]  # distance 5, not < 5
    assert is_near_duplicate(entry(a, 0), entry(four, 0))
    assert not is_near_duplicate(entry(a, 0), entry(five, 0))
    assert is_near_duplicate(entry(a, 0, "same"), entry(far(3), 0, "same"))  # exact text


def test_entry_json_round_trip_is_exact() -> None:
    e = BufferEntry(
        [5, 17, 2**31 - 1], -1.2345678901234567, {"log_c": -0.1, "log_pq": -7.5}, "¿Qué?"
    )
    back = BufferEntry.from_json(e.to_json())
    assert back == e
    assert back.log_r == e.log_r  # repr floats round-trip bit-exactly
    assert BufferEntry.from_json(e.to_json().encode()) == e
    # Tensors from the reward are accepted and stored as plain Python numbers.
    t = BufferEntry(torch.tensor([1, 2]), torch.tensor(-1.5), {"log_c": torch.tensor(-0.5)}, "x")
    assert t.token_ids == [1, 2] and type(t.log_r) is float and type(t.components["log_c"]) is float


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", "not valid entry JSON"),
        ('"a string"', "expected a JSON object"),
        ('{"token_ids": [1], "log_r": 0, "components": {}}', r"missing key\(s\) \['text'\]"),
        ('{"token_ids": [1], "log_r": 0, "components": {}, "text": "", "x": 1}', "unexpected"),
        ('{"token_ids": [], "log_r": 0, "components": {}, "text": ""}', "'token_ids'"),
        ('{"token_ids": [1, "2"], "log_r": 0, "components": {}, "text": ""}', r"'token_ids'\[1\]"),
        ('{"token_ids": [1, -4], "log_r": 0, "components": {}, "text": ""}', r"'token_ids'\[1\]"),
        ('{"token_ids": [true], "log_r": 0, "components": {}, "text": ""}', r"'token_ids'\[0\]"),
        ('{"token_ids": [1], "log_r": "0", "components": {}, "text": ""}', "'log_r'"),
        ('{"token_ids": [1], "log_r": NaN, "components": {}, "text": ""}', "NaN"),
        ('{"token_ids": [1], "log_r": 1e999, "components": {}, "text": ""}', "'log_r'"),
        ('{"token_ids": [1], "log_r": 0, "components": [], "text": ""}', "'components'"),
        ('{"token_ids": [1], "log_r": 0, "components": {"c": null}, "text": ""}', "'c'"),
        ('{"token_ids": [1], "log_r": 0, "components": {}, "text": 3}', "'text'"),
        (b"\xff\xfe", "not valid entry JSON"),
    ],
)
def test_from_json_rejects_malformed_values(raw: str | bytes, match: str) -> None:
    with pytest.raises(BufferCorruptError, match=match) as exc:
        BufferEntry.from_json(raw, where="somewhere")
    assert "somewhere" in str(exc.value)


def test_entry_constructor_validates() -> None:
    with pytest.raises(ValueError, match="'log_r'"):
        BufferEntry([1], float("nan"), {}, "x")
    with pytest.raises(ValueError, match="'token_ids'"):
        BufferEntry([], 0.0, {}, "x")


def test_merge_entries_invariants_on_random_streams() -> None:
    """Random streams full of duplicates: <= K, no duplicate pair, and the best survive."""
    rng = random.Random(1)
    for trial in range(30):
        pool = []
        for _ in range(60):
            base = far(rng.randrange(12), n=8)
            for _ in range(rng.randrange(3)):
                base[rng.randrange(8)] = rng.randrange(50)
            pool.append(entry(base, rng.uniform(-5, 0), f"q{rng.randrange(25)}"))
        k = 1 + trial % 7
        kept: list[BufferEntry] = []
        for i in range(0, len(pool), 7):
            kept = merge_entries(kept, pool[i : i + 7], k)
        assert len(kept) <= k
        assert kept == sorted(kept, key=lambda e: -e.log_r)
        for a, b in itertools.combinations(kept, 2):
            assert not is_near_duplicate(a, b)
        assert max(pool, key=lambda e: e.log_r) in kept  # nothing can evict the global best


def test_merge_entries_validates_max_size() -> None:
    with pytest.raises(ValueError, match="max_size"):
        merge_entries([], [], 0)


def test_sample_indices_uses_only_the_given_generator() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    py_before = random.getstate()
    g = torch.Generator().manual_seed(0)
    sample_indices([0.0, -1.0, -2.0], 50, g, prioritized=True)
    sample_indices([0.0, -1.0, -2.0], 50, g, prioritized=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert random.getstate() == py_before
    assert sample_indices([], 5, g) == [] and sample_indices([0.0], 0, g) == []
    with pytest.raises(ValueError, match="temperature"):
        sample_indices([0.0], 1, g, temperature=0.0)
    with pytest.raises(ValueError, match="n must be"):
        sample_indices([0.0], -1, g)


def test_build_buffer_memory_and_config_errors() -> None:
    cfg = {"backend": "memory", "max_size": 7, "prioritized": True, "use_buffer_prob": 0.5}
    buf = build_buffer(cfg)
    assert isinstance(buf, MemoryBuffer) and buf.max_size == 7
    from omegaconf import OmegaConf

    yaml = Path(__file__).resolve().parents[1] / "configs" / "buffer" / "memory.yaml"
    buf = build_buffer(OmegaConf.load(yaml))
    assert isinstance(buf, MemoryBuffer) and buf.max_size == 50
    with pytest.raises(ValueError, match="backend"):
        build_buffer({"backend": "disk"})
    with pytest.raises(ValueError, match="max_size"):
        build_buffer({"backend": "memory", "max_size": 0})


# --------------------------------------------------------------------------------------------
# The same behaviour on both backends
# --------------------------------------------------------------------------------------------

Factory = Callable[..., ReplayBuffer]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_buffer(request: pytest.FixtureRequest) -> Factory:
    """``make_buffer(max_size=K)``: an empty buffer of the parametrised backend."""
    if request.param == "memory":
        return lambda max_size=50: MemoryBuffer(max_size=max_size)
    handle = request.getfixturevalue("redis_handle")
    made = []

    def make(max_size: int = 50) -> ReplayBuffer:
        buf = handle.buffer(max_size=max_size)
        made.append(buf)
        return buf

    request.addfinalizer(lambda: [(b.clear(), b.close()) for b in made])
    return make


def test_round_trip(make_buffer: Factory) -> None:
    buf = make_buffer()
    key = prompt_key([1, 2, 3])
    es = [entry(far(i), -float(i), f"question {i}?") for i in range(5)]
    assert buf.add(key, es[::-1]) == 5
    got = buf.entries(key)
    assert got == es  # best first, every field intact
    assert buf.size(key) == 5 and buf.size("other") == 0
    assert buf.keys() == [key]
    assert buf.entries("other") == []
    buf.clear()
    assert buf.keys() == [] and buf.size(key) == 0


def test_top_k_keeps_the_best_k(make_buffer: Factory) -> None:
    buf = make_buffer(max_size=4)
    rng = random.Random(3)
    es = [entry(far(i), rng.uniform(-10, 0)) for i in range(12)]
    inserted = sum(buf.add("k", es[i : i + 3]) for i in range(0, 12, 3))
    best = sorted(es, key=lambda e: -e.log_r)[:4]
    assert buf.entries("k") == best
    assert 4 <= inserted <= 12
    # An entry worse than all K is not inserted; a better one evicts the worst.
    assert buf.add("k", [entry(far(50), best[-1].log_r - 1.0)]) == 0
    top = entry(far(51), best[0].log_r + 1.0)
    assert buf.add("k", [top]) == 1
    assert buf.entries("k") == [top, *best[:3]]


def test_exact_text_duplicates_keep_the_higher_reward(make_buffer: Factory) -> None:
    buf = make_buffer()
    low, high = entry(far(0), -2.0, "Where?"), entry(far(1), -1.0, "Where?")
    assert buf.add("k", [low]) == 1
    assert buf.add("k", [high]) == 1  # better duplicate replaces
    assert buf.entries("k") == [high]
    assert buf.add("k", [entry(far(2), -1.5, "Where?")]) == 0  # worse duplicate dropped
    assert buf.add("k", [entry(far(3), -1.0, "Where?")]) == 0  # a tie keeps the incumbent
    assert buf.entries("k") == [high]
    # Duplicates inside one batch too.
    assert buf.add("j", [low, high, entry(far(4), -3.0, "Where?")]) == 1
    assert buf.entries("j") == [high]


def test_near_duplicates_keep_the_higher_reward(make_buffer: Factory) -> None:
    buf = make_buffer()
    a = list(range(1, 11))
    b = [101, 102, 103, 104, 105, 106, *a[6:]]  # distance(a, b) = 6 >= 5: both kept
    c = [101, 102, 103, *a[3:]]  # distance 3 to a and to b: near-duplicate of both
    ea, eb = entry(a, -2.0, "a"), entry(b, -3.0, "b")
    assert buf.add("k", [ea, eb]) == 2
    assert buf.add("k", [entry(c, -2.5, "c")]) == 0  # worse than a: dropped
    assert buf.entries("k") == [ea, eb]
    ec = entry(c, -1.0, "c")
    assert buf.add("k", [ec]) == 1  # better than both: replaces both
    assert buf.entries("k") == [ec]
    assert buf.add("k", [entry(far(7), -9.0, "unrelated")]) == 1
    assert buf.size("k") == 2


def test_prioritized_sampling_favours_high_rewards_and_is_reproducible(
    make_buffer: Factory,
) -> None:
    buf = make_buffer()
    log_r = [0.0, -1.0, -2.0, -3.0]
    buf.add("k", [entry(far(i), r, f"q{i}") for i, r in enumerate(log_r)])
    n = 4000
    picks = buf.sample("k", n, torch.Generator().manual_seed(0), prioritized=True)
    assert len(picks) == n
    counts = Counter(e.text for e in picks)
    probs = torch.softmax(torch.tensor(log_r), 0).tolist()  # [0.644, 0.237, 0.087, 0.032]
    for i, p in enumerate(probs):  # within ~5 standard errors
        assert abs(counts[f"q{i}"] / n - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3
    same = buf.sample("k", 64, torch.Generator().manual_seed(7))
    again = buf.sample("k", 64, torch.Generator().manual_seed(7))
    other = buf.sample("k", 64, torch.Generator().manual_seed(8))
    assert [e.text for e in same] == [e.text for e in again]
    assert [e.text for e in same] != [e.text for e in other]
    # A high temperature flattens the distribution.
    hot = Counter(
        e.text for e in buf.sample("k", 2000, torch.Generator().manual_seed(1), temperature=100.0)
    )
    assert min(hot.values()) > 2000 * 0.2
    # Sampled entries are complete entries (components included), ready to re-temper.
    assert picks[0].components["log_pq"] == -3.0
    assert buf.sample("missing", 5, torch.Generator()) == []


def test_uniform_sampling(make_buffer: Factory) -> None:
    buf = make_buffer()
    buf.add("k", [entry(far(i), -3.0 * i, f"q{i}") for i in range(4)])
    n = 4000
    picks = buf.sample("k", n, torch.Generator().manual_seed(0), prioritized=False)
    counts = Counter(e.text for e in picks)
    se = (0.25 * 0.75 / n) ** 0.5
    assert all(abs(counts[f"q{i}"] / n - 0.25) < 5 * se for i in range(4))
    a = buf.sample("k", 32, torch.Generator().manual_seed(3), prioritized=False)
    b = buf.sample("k", 32, torch.Generator().manual_seed(3), prioritized=False)
    assert a == b


def test_memory_state_dict_round_trip_through_weights_only_checkpoint(tmp_path: Path) -> None:
    buf = MemoryBuffer(max_size=3)
    buf.add("k1", [entry(far(i), -float(i), f"q{i}") for i in range(5)])
    buf.add("k2", [entry(far(9), -0.5, "other")])
    state = buf.state_dict()
    json.dumps(state)  # JSON-able only
    path = tmp_path / "ckpt.pt"
    torch.save({"buffer": state}, path)
    loaded = torch.load(path, weights_only=True)["buffer"]
    fresh = MemoryBuffer(max_size=3)
    fresh.load_state_dict(loaded)
    assert fresh.keys() == ["k1", "k2"]
    assert fresh.entries("k1") == buf.entries("k1") and fresh.entries("k2") == buf.entries("k2")
    # A smaller configured size truncates on load; bad state names the problem.
    small = MemoryBuffer(max_size=1)
    small.load_state_dict(loaded)
    assert small.entries("k1") == buf.entries("k1")[:1]
    bad = json.loads(json.dumps(state))
    bad["entries"]["k1"][1]["log_r"] = "high"
    with pytest.raises(BufferCorruptError, match=r"entries\['k1'\]\[1\].*'log_r'"):
        fresh.load_state_dict(bad)
    with pytest.raises(BufferCorruptError, match="version"):
        fresh.load_state_dict({"entries": {}})
