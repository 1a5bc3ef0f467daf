"""A rank of the torch.distributed tests (run under torchrun): every call torch.distributed
offers on CPU tensors, over the "oxccl" backend, checked. Prints ``PASS torch rank <r>``."""

from __future__ import annotations

import torch
import torch._C._distributed_c10d as c10d
import torch.distributed as dist

import oxccl.torch

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
]


def val(rank: int, n: int, dt: torch.dtype) -> torch.Tensor:
    return ((torch.arange(n) * 3 + rank * 7) % 5 + 1).to(dt)


def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.double(), b.double()))


def main() -> None:
    dist.init_process_group("oxccl")
    r, w = dist.get_rank(), dist.get_world_size()
    n = 4 * w
    for dt in DTYPES:
        every = [val(k, n, dt) for k in range(w)]
        stack = torch.stack([e.double() for e in every])
        ops = [
            (dist.ReduceOp.SUM, stack.sum(0)),
            (dist.ReduceOp.MIN, stack.min(0).values),
            (dist.ReduceOp.MAX, stack.max(0).values),
            (dist.ReduceOp.PRODUCT, stack.prod(0)),
        ]
        if dt.is_floating_point:
            ops.append((dist.ReduceOp.AVG, stack.mean(0)))
        for op, want in ops:
            t = every[r].clone()
            dist.all_reduce(t, op=op)
            if dt.is_floating_point and op == dist.ReduceOp.AVG:
                assert torch.allclose(t.double(), want, rtol=1e-2), (dt, op, t)
            else:
                assert eq(t, want.to(dt)), (dt, op, t, want)
        t = every[r].clone()
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        assert eq(t, stack.sum(0).to(dt)), dt
        t = every[r].clone()
        dist.broadcast(t, src=w - 1)
        assert eq(t, every[w - 1]), dt
        t = every[r].clone()
        dist.reduce(t, dst=0)
        if r == 0:
            assert eq(t, stack.sum(0).to(dt)), dt
        outs = [torch.zeros(n, dtype=dt) for _ in range(w)]
        dist.all_gather(outs, every[r])
        assert all(eq(o, e) for o, e in zip(outs, every)), dt
        big = torch.zeros(n * w, dtype=dt)
        dist.all_gather_into_tensor(big, every[r])
        assert eq(big, torch.cat(every)), dt
        part = torch.zeros(n // w, dtype=dt)
        dist.reduce_scatter_tensor(part, every[r])
        assert eq(part, stack.sum(0)[r * (n // w) : (r + 1) * (n // w)].to(dt)), dt
        part = torch.zeros(n // w, dtype=dt)
        dist.reduce_scatter(part, list(every[r].chunk(w)))
        assert eq(part, stack.sum(0)[r * (n // w) : (r + 1) * (n // w)].to(dt)), dt
        # all_to_all with tensors of different sizes, all_to_all_single uneven.
        ins = [torch.full((k + 1,), r * 10 + k, dtype=dt) for k in range(w)]
        outs = [torch.zeros(r + 1, dtype=dt) for _ in range(w)]
        dist.all_to_all(outs, ins)
        assert all(eq(o, torch.full((r + 1,), j * 10 + r, dtype=dt)) for j, o in enumerate(outs)), (
            dt
        )
        inp = torch.cat(ins)
        out = torch.zeros(w * (r + 1), dtype=dt)
        dist.all_to_all_single(
            out, inp, output_split_sizes=[r + 1] * w, input_split_sizes=[k + 1 for k in range(w)]
        )
        assert eq(out, torch.cat(outs)), dt
        # gather and scatter to and from rank 0.
        got = [torch.zeros(n, dtype=dt) for _ in range(w)] if r == 0 else None
        dist.gather(every[r], got, dst=0)
        if r == 0:
            assert all(eq(g, e) for g, e in zip(got, every)), dt
        piece = torch.zeros(n, dtype=dt)
        dist.scatter(piece, every if r == 0 else None, src=0)
        assert eq(piece, every[r]), dt
    # Point to point: irecv before isend, batch_isend_irecv, blocking pairs.
    nxt, prv = (r + 1) % w, (r - 1) % w
    rx = torch.zeros(5)
    q = dist.irecv(rx, prv)
    s = dist.isend(torch.full((5,), float(r)), nxt)
    q.wait()
    s.wait()
    assert (rx == prv).all()
    rx = torch.zeros(3, dtype=torch.int64)
    reqs = dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, torch.full((3,), r), nxt), dist.P2POp(dist.irecv, rx, prv)]
    )
    for q in reqs:
        q.wait()
    assert (rx == prv).all()
    if r == 0:
        dist.send(torch.arange(4.0), 1)
    elif r == 1:
        got1 = torch.zeros(4)
        dist.recv(got1, 0)
        assert (got1 == torch.arange(4.0)).all()
    dist.barrier()
    # A group with its own traffic class.
    g = dist.new_group([0, 1], pg_options=oxccl.torch.Options(traffic_class="weight_refit"))
    if r < 2:
        y = torch.ones(2)
        dist.all_reduce(y, group=g)
        assert (y == 2).all()
        assert (
            isinstance(g, oxccl.torch.ProcessGroupOxccl) and g.comm.traffic_class == "weight_refit"
        )
    dist.barrier()
    # The names older torch releases call (torch 2.15 calls the newer ones above).
    pg = dist.group.WORLD
    assert isinstance(pg, oxccl.torch.ProcessGroupOxccl)
    out = torch.zeros(2 * w)
    pg._allgather_base(out, torch.full((2,), float(r)), c10d.AllgatherOptions()).wait()
    assert eq(out, torch.arange(w).repeat_interleave(2).float())
    part = torch.zeros(2)
    opts = c10d.ReduceScatterOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    pg._reduce_scatter_base(part, torch.ones(2 * w), opts).wait()
    assert (part == w).all()
    a2a = torch.zeros(w)
    pg.alltoall_base(a2a, torch.arange(w).float() + 10 * r, [], [], c10d.AllToAllOptions()).wait()
    assert eq(a2a, torch.arange(w).float() * 10 + r)
    # Coalesced forms (torch's _coalescing_manager), called directly.
    outs2 = [torch.zeros(2 * w), torch.zeros(3 * w)]
    pg.all_gather_single_coalesced(
        outs2, [torch.full((2,), float(r)), torch.full((3,), float(r))]
    ).wait()
    assert eq(outs2[1], torch.arange(w).repeat_interleave(3).float())
    parts = [torch.zeros(1), torch.zeros(2)]
    pg.reduce_scatter_single_coalesced(parts, [torch.ones(w), torch.ones(2 * w)], opts).wait()
    assert (parts[0] == w).all() and (parts[1] == w).all()
    more_types(r, w)
    tags_and_order(r, w)
    futures(r, w)
    bad_calls(r, w)
    print(f"PASS torch rank {r}", flush=True)
    dist.destroy_process_group()


def more_types(r: int, w: int) -> None:
    """uint32 and uint64 (torch 2.3 and later), for the calls torch supports on them."""
    for name in ("uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is None:
            continue
        t = torch.tensor([r + 1, 2**31 + r], dtype=torch.int64).to(dt)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        assert t.to(torch.int64).tolist() == [w, 2**31 + w - 1], (name, t)
        t = torch.tensor([r + 1, 7], dtype=torch.int64).to(dt)
        dist.all_reduce(t)
        assert t.to(torch.int64).tolist() == [w * (w + 1) // 2, 7 * w], (name, t)
        big = torch.zeros(2 * w, dtype=dt)
        dist.all_gather_into_tensor(big, torch.tensor([r, r], dtype=torch.int64).to(dt))
        assert big.to(torch.int64).tolist() == [k for k in range(w) for _ in range(2)], name
        b = torch.tensor([r * 5], dtype=torch.int64).to(dt)
        dist.broadcast(b, src=w - 1)
        assert b.to(torch.int64).tolist() == [(w - 1) * 5], name


def tags_and_order(r: int, w: int) -> None:
    """Tagged sends match tagged receives in call order (as with NCCL; the tag is checked);
    sends and receives outstanding across a gather and a scatter keep their place."""
    import oxccl

    nxt, prv = (r + 1) % w, (r - 1) % w
    a, b = torch.zeros(3), torch.zeros(4)
    qa, qb = dist.irecv(a, prv, tag=5), dist.irecv(b, prv, tag=6)
    sa = dist.isend(torch.full((3,), float(r)), nxt, tag=5)
    sb = dist.isend(torch.full((4,), float(r) + 0.5), nxt, tag=6)
    for q in (qa, qb, sa, sb):
        q.wait()
    assert (a == prv).all() and (b == prv + 0.5).all(), (a, b)
    # Rank 0's isend to the root, and the root's irecv, both outstanding across a gather and
    # a scatter rooted there (posted in the same order on both sides).
    root = 1
    user = torch.zeros(2)
    pending = None
    if r == 0:
        pending = dist.isend(torch.full((2,), 42.0), root, tag=9)
    elif r == root:
        pending = dist.irecv(user, 0, tag=9)
    got = [torch.zeros(3) for _ in range(w)] if r == root else None
    dist.gather(torch.full((3,), float(r)), got, dst=root)
    piece = torch.zeros(2)
    dist.scatter(
        piece, [torch.full((2,), 100.0 + k) for k in range(w)] if r == root else None, src=root
    )
    assert (piece == 100.0 + r).all(), piece
    if pending is not None:
        pending.wait()
    if r == root:
        assert got is not None and all((g == k).all() for k, g in enumerate(got)), got
        assert (user == 42.0).all(), user
    # Tags met in another order: the receive raises, naming both tags (in a group of its
    # own, whose communicator that error fails; the world's goes on).
    pair = dist.new_group([0, 1])
    if r == 0:
        try:
            dist.isend(torch.ones(2), 1, tag=1, group=pair).wait()
        except oxccl.OxcclError:
            pass  # the send may also end with the receiver's error
    elif r == 1:
        try:
            dist.irecv(torch.zeros(2), 0, tag=2, group=pair).wait()
            raise AssertionError("a receive for tag 2 took a message sent with tag 1")
        except oxccl.InvalidUsageError as e:
            assert "(tag 2)" in str(e) and "(tag 1)" in str(e), e
    dist.barrier()


def futures(r: int, w: int) -> None:
    """Work.get_future() chained with then(), and torch.futures.wait_all over several."""
    t = torch.full((3,), float(r))
    fut = dist.all_reduce(t, async_op=True).get_future()
    doubled = fut.then(lambda f: f.value()[0] * 2).wait()
    assert (doubled == 2 * sum(range(w))).all(), doubled
    ts = [torch.full((2,), float(r + k)) for k in range(3)]
    futs = [dist.all_reduce(x, async_op=True).get_future() for x in ts]
    torch.futures.wait_all(futs)
    for k, x in enumerate(ts):
        assert (x == sum(range(w)) + k * w).all(), (k, x)


def bad_calls(r: int, w: int) -> None:
    """Bad calls raise at once on the rank that makes them, and lose nothing: every rank
    makes the same bad calls, then a good one that must still give the right answer."""
    import oxccl

    def refused(what: str, fn: object, *kinds: type) -> None:
        try:
            fn()  # type: ignore[operator]
        except kinds as e:
            assert str(e), what
            return
        raise AssertionError(f"{what}: no error")

    t = torch.ones(4)
    refused("BAND", lambda: dist.all_reduce(t, op=dist.ReduceOp.BAND), ValueError, RuntimeError)
    strided = torch.zeros(4, 2)[:, 0]
    refused("non-contiguous output", lambda: dist.all_reduce(strided), ValueError, RuntimeError)
    refused("negative tag", lambda: dist.isend(torch.ones(1), (r + 1) % w, tag=-1), ValueError)
    refused("any-source recv", lambda: dist.recv(torch.zeros(1)), NotImplementedError, RuntimeError)
    refused(
        "wrong number of all_gather outputs",
        lambda: dist.all_gather([torch.zeros(2)] * (w + 1), torch.ones(2)),
        ValueError,
        RuntimeError,
    )
    refused(
        "root out of range",
        lambda: dist.group.WORLD.broadcast([torch.ones(1)], _bopts(w)).wait(),
        oxccl.InvalidArgumentError,
    )
    dist.all_reduce(t)
    assert (t == w).all(), t


def _bopts(root: int) -> object:
    o = c10d.BroadcastOptions()
    o.rootRank = root
    return o


if __name__ == "__main__":
    main()
