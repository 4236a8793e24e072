"""The engine's reference-counted chunk cache under concurrency: every chunk decoded exactly once.

A fake volume sleeps a random time inside ``read`` so that owners, waiters and late arrivals
interleave in every order; many threads ask for every chunk as many times as it is used.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from fastseg_eval.engine.threads import _ChunkCache


class SlowVolume:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.reads: dict[tuple[int, ...], int] = {}
        self.lock = threading.Lock()

    def read(self, region):
        key = tuple(s.start for s in region)
        with self.lock:
            self.reads[key] = self.reads.get(key, 0) + 1
            delay = self.rng.random() * 0.002
        time.sleep(delay)
        return np.full(4, key[0], dtype=np.uint8)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_every_chunk_is_decoded_once_and_freed(seed, budget):
    rng = random.Random(seed)
    uses = {(i,): rng.randint(1, 6) for i in range(40)}
    vol = SlowVolume(seed)
    cache = _ChunkCache(vol, lambda idx: uses[idx], budget)
    requests = [idx for idx, n in uses.items() for _ in range(n)]
    rng.shuffle(requests)
    # keep requests for one chunk close together, as the engine's C-order walk does
    requests.sort(key=lambda idx: idx[0] + rng.random() * 3)
    it = iter(requests)
    lock = threading.Lock()
    errors = []

    def work():
        while True:
            with lock:
                idx = next(it, None)
            if idx is None:
                return
            arr = cache.get(idx, (slice(idx[0], idx[0] + 1),))
            if int(arr[0]) != idx[0]:
                errors.append(idx)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    if budget:
        assert vol.reads == {(i,): 1 for i in range(40)}  # decoded once each
        assert cache.decodes == 40
    else:  # no budget: kept only for threads already waiting; never more reads than uses
        assert all(vol.reads[idx] <= n for idx, n in uses.items())
        assert cache.decodes == sum(vol.reads.values())
    assert cache.data == {} and cache.nbytes == 0  # everything freed after its last use
    assert cache.left == {} and cache.pending == {}
