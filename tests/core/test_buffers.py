"""BufferPool: a buffer is handed out again only once nothing refers to it.

The tests compare ``id(view.obj)`` and never keep a reference to a pool's bytearray
themselves (that reference alone would keep the buffer busy). A kept buffer stays alive in
the pool, so an equal id means the same buffer."""

import numpy as np
import pytest
import torch

from medfed.core.buffers import ROUND_UP, BufferPool


def _kept(pool: BufferPool) -> list[int]:
    return [id(b) for b in pool._buffers]


def test_an_idle_buffer_is_handed_out_again():
    pool = BufferPool(keep=2)
    v = pool.take(100)
    first = id(v.obj)
    del v
    w = pool.take(100)
    assert id(w.obj) == first
    del w
    assert id(pool.take(50).obj) == first  # a smaller payload fits as well


def test_a_buffer_is_not_handed_out_while_a_memoryview_of_it_is_alive():
    pool = BufferPool(keep=2)
    v = pool.take(100)
    first = id(v.obj)
    part = v[10:20]  # a slice of the view refers to the buffer too
    del v
    w = pool.take(100)
    second = id(w.obj)
    assert second != first
    del w
    assert id(pool.take(100).obj) == second  # the second is idle again, the first is not
    del part
    x = pool.take(100)
    assert id(x.obj) == first
    y = pool.take(100)
    assert id(y.obj) == second


@pytest.mark.parametrize("make", [
    lambda v: torch.frombuffer(v, dtype=torch.uint8),
    lambda v: torch.frombuffer(v, dtype=torch.float32, count=4, offset=8).reshape(2, 2),
    lambda v: torch.frombuffer(v, dtype=torch.uint8)[3:5],
    lambda v: np.frombuffer(v, dtype=np.uint8),
    lambda v: memoryview(v).cast("B"),
], ids=["tensor", "tensor-part", "tensor-slice", "array", "cast"])
def test_a_buffer_is_not_handed_out_while_a_tensor_made_from_it_is_alive(make):
    pool = BufferPool(keep=2)
    v = pool.take(64)
    first = id(v.obj)
    t = make(v)
    del v
    w = pool.take(64)
    second = id(w.obj)
    assert second != first
    del w
    assert id(pool.take(64).obj) == second
    del t
    assert id(pool.take(64).obj) == first


def test_writing_to_a_reused_buffer_leaves_a_tensor_in_use_intact():
    pool = BufferPool(keep=2)
    v = pool.take(16)
    v[:] = bytes(range(16))
    t = torch.frombuffer(v, dtype=torch.uint8)
    del v
    for _ in range(3):
        w = pool.take(16)
        w[:] = b"\xff" * 16
        del w
    assert t.tolist() == list(range(16))


def test_at_most_keep_buffers_are_kept():
    pool = BufferPool(keep=2)
    held = [pool.take(100) for _ in range(4)]  # all busy: four distinct buffers
    ids = [id(v.obj) for v in held]
    assert len(set(ids)) == 4
    assert _kept(pool) == ids[:2]
    del held
    again = [pool.take(100) for _ in range(2)]
    assert [id(v.obj) for v in again] == ids[:2]
    assert len(_kept(pool)) == 2


def test_keep_zero_keeps_nothing():
    pool = BufferPool(keep=0)
    v = pool.take(10)
    assert len(v) == 10 and _kept(pool) == []


def test_a_payload_larger_than_every_idle_buffer_replaces_an_idle_one():
    pool = BufferPool(keep=2)
    a, b = pool.take(10), pool.take(10)
    id_a, id_b = id(a.obj), id(b.obj)
    del a  # a idle, b busy
    big = pool.take(3 * ROUND_UP + 1)
    id_big = id(big.obj)
    assert id_big not in (id_a, id_b) and len(big.obj) >= 3 * ROUND_UP + 1
    assert _kept(pool) == [id_big, id_b]  # the idle small one made room, the busy one stays
    del big
    x = pool.take(2 * ROUND_UP)
    assert id(x.obj) == id_big  # the large buffer serves large payloads from now on
    y = pool.take(2 * ROUND_UP)  # while it is busy (and b is too small and busy): a new one, not kept
    assert id(y.obj) not in (id_big, id_b) and _kept(pool) == [id_big, id_b]


def test_a_large_payload_while_every_buffer_is_busy_is_not_kept():
    pool = BufferPool(keep=1)
    a = pool.take(10)
    id_a = id(a.obj)
    big = pool.take(2 * ROUND_UP)
    assert len(big) == 2 * ROUND_UP and id(big.obj) != id_a
    assert _kept(pool) == [id_a]
    del a
    assert id(pool.take(10).obj) == id_a


@pytest.mark.parametrize("size", [0, 1, 7, 100, ROUND_UP - 1, ROUND_UP, ROUND_UP + 1, 2 * ROUND_UP + 3])
def test_views_have_exactly_the_requested_length(size):
    pool = BufferPool(keep=2)
    v = pool.take(size)
    assert len(v) == size and v.nbytes == size and v.format == "B" and not v.readonly
    assert len(v.obj) >= size and len(v.obj) % ROUND_UP == 0
    del v
    for smaller in (size, size // 2, 0):  # the same buffer again, viewed at each length
        w = pool.take(smaller)
        assert len(w) == smaller
        del w


def test_a_reused_buffer_is_viewed_at_the_new_length():
    pool = BufferPool(keep=1)
    v = pool.take(1000)
    first = id(v.obj)
    del v
    w = pool.take(10)
    assert id(w.obj) == first and len(w) == 10
    w[:] = b"0123456789"
    assert bytes(w) == b"0123456789"
