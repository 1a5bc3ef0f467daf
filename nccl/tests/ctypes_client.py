"""A ctypes client of the NCCL C API, written the way vLLM's wrapper is (the library from
VLLM_NCCL_SO_PATH, the same symbols and argument types: the unique id passed by value,
pointers as c_void_p, enums as c_int). Standard library only.

    python3 ctypes_client.py RANK NRANKS IDFILE

Rank 0 writes the unique id to IDFILE. Prints "PASS ctypes rank R".
"""

import ctypes
import os
import sys
import time

ncclResult_t = ctypes.c_int
ncclComm_t = ctypes.c_void_p
ncclWindow_t = ctypes.c_void_p
cudaStream_t = ctypes.c_void_p
buffer_type = ctypes.c_void_p
ncclDataType_t = ctypes.c_int
ncclRedOp_t = ctypes.c_int


class ncclUniqueId(ctypes.Structure):  # noqa: N801 - NCCL's name
    _fields_ = [("internal", ctypes.c_byte * 128)]


ncclFloat32, ncclInt64, ncclBfloat16 = 7, 4, 9
ncclSum, ncclMax = 0, 2

# name: (result type, argument types), as vLLM declares them.
FUNCTIONS = {
    "ncclGetErrorString": (ctypes.c_char_p, [ncclResult_t]),
    "ncclGetVersion": (ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    "ncclGetUniqueId": (ncclResult_t, [ctypes.POINTER(ncclUniqueId)]),
    "ncclCommInitRank": (
        ncclResult_t,
        [ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int],
    ),
    "ncclAllReduce": (
        ncclResult_t,
        [
            buffer_type,
            buffer_type,
            ctypes.c_size_t,
            ncclDataType_t,
            ncclRedOp_t,
            ncclComm_t,
            cudaStream_t,
        ],
    ),
    "ncclAllGather": (
        ncclResult_t,
        [buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ncclComm_t, cudaStream_t],
    ),
    "ncclReduceScatter": (
        ncclResult_t,
        [
            buffer_type,
            buffer_type,
            ctypes.c_size_t,
            ncclDataType_t,
            ncclRedOp_t,
            ncclComm_t,
            cudaStream_t,
        ],
    ),
    "ncclReduce": (
        ncclResult_t,
        [
            buffer_type,
            buffer_type,
            ctypes.c_size_t,
            ncclDataType_t,
            ncclRedOp_t,
            ctypes.c_int,
            ncclComm_t,
            cudaStream_t,
        ],
    ),
    "ncclSend": (
        ncclResult_t,
        [buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t],
    ),
    "ncclRecv": (
        ncclResult_t,
        [buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t],
    ),
    "ncclBroadcast": (
        ncclResult_t,
        [
            buffer_type,
            buffer_type,
            ctypes.c_size_t,
            ncclDataType_t,
            ctypes.c_int,
            ncclComm_t,
            cudaStream_t,
        ],
    ),
    "ncclCommDestroy": (ncclResult_t, [ncclComm_t]),
    "ncclGroupStart": (ncclResult_t, []),
    "ncclGroupEnd": (ncclResult_t, []),
    "ncclCommWindowRegister": (
        ncclResult_t,
        [ncclComm_t, buffer_type, ctypes.c_size_t, ctypes.POINTER(ncclWindow_t), ctypes.c_int],
    ),
    "ncclCommWindowDeregister": (ncclResult_t, [ncclComm_t, ncclWindow_t]),
    "ncclCommRegister": (
        ncclResult_t,
        [ncclComm_t, buffer_type, ctypes.c_size_t, ctypes.POINTER(buffer_type)],
    ),
    "ncclCommDeregister": (ncclResult_t, [ncclComm_t, buffer_type]),
    "ncclGetLastError": (ctypes.c_char_p, [ncclComm_t]),
}


class Nccl:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for name, (res, args) in FUNCTIONS.items():
            f = getattr(self.lib, name)
            f.restype, f.argtypes = res, args

    def check(self, result, what):
        if result != 0:
            err = self.lib.ncclGetErrorString(result).decode()
            last = self.lib.ncclGetLastError(None).decode()
            raise RuntimeError(f"{what}: NCCL error {result}: {err}: {last}")

    def __getattr__(self, name):
        f = getattr(self.lib, name)

        def call(*args):
            r = f(*args)
            self.check(r, name)

        return call


def addr(a):
    return ctypes.cast(a, ctypes.c_void_p)


def main():
    rank, n, idfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    nccl = Nccl(os.environ["VLLM_NCCL_SO_PATH"])
    v = ctypes.c_int()
    nccl.ncclGetVersion(ctypes.byref(v))
    assert v.value >= 22700, v.value
    uid = ncclUniqueId()
    if rank == 0:
        nccl.ncclGetUniqueId(ctypes.byref(uid))
        with open(idfile + ".tmp", "wb") as f:
            f.write(bytes(uid.internal))
        os.rename(idfile + ".tmp", idfile)
    else:
        until = time.monotonic() + 60
        while not os.path.exists(idfile):
            assert time.monotonic() < until, "no id"
            time.sleep(0.01)
        with open(idfile, "rb") as f:
            ctypes.memmove(ctypes.byref(uid), f.read(128), 128)
    comm = ncclComm_t()
    nccl.ncclCommInitRank(ctypes.byref(comm), n, uid, rank)

    # all_reduce, in place, float32 and int64
    x = (ctypes.c_float * 6)(*[float(rank + i) for i in range(6)])
    nccl.ncclAllReduce(addr(x), addr(x), 6, ncclFloat32, ncclSum, comm, None)
    assert list(x) == [float(sum(r + i for r in range(n))) for i in range(6)], list(x)
    y = (ctypes.c_int64 * 3)(rank, -rank, 7)
    nccl.ncclAllReduce(addr(y), addr(y), 3, ncclInt64, ncclMax, comm, None)
    assert list(y) == [n - 1, 0, 7], list(y)
    # bfloat16 as raw 16-bit words (1.0 is 0x3f80)
    h = (ctypes.c_uint16 * 4)(*([0x3F80] * 4))
    nccl.ncclAllReduce(addr(h), addr(h), 4, ncclBfloat16, ncclSum, comm, None)
    want = {1: 0x3F80, 2: 0x4000, 3: 0x4040}[n]
    assert list(h) == [want] * 4, [hex(w) for w in h]
    # all_gather and reduce_scatter (vLLM's sequence-parallel pair)
    mine = (ctypes.c_float * 2)(rank, rank + 0.5)
    every = (ctypes.c_float * (2 * n))()
    nccl.ncclAllGather(addr(mine), addr(every), 2, ncclFloat32, comm, None)
    assert list(every) == [v for r in range(n) for v in (r, r + 0.5)], list(every)
    part = (ctypes.c_float * 2)()
    nccl.ncclReduceScatter(addr(every), addr(part), 2, ncclFloat32, ncclSum, comm, None)
    assert list(part) == [n * rank, n * (rank + 0.5)], list(part)
    # broadcast and reduce
    b = (ctypes.c_float * 3)(*([float(rank)] * 3))
    nccl.ncclBroadcast(addr(b), addr(b), 3, ncclFloat32, n - 1, comm, None)
    assert list(b) == [float(n - 1)] * 3
    r = (ctypes.c_float * 3)()
    nccl.ncclReduce(addr(b), addr(r), 3, ncclFloat32, ncclSum, 0, comm, None)
    if rank == 0:
        assert list(r) == [float(n * (n - 1))] * 3, list(r)
    # send/recv in a group: everyone sends to the next and receives from the previous
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    out = (ctypes.c_float * 5)(*([float(rank)] * 5))
    inc = (ctypes.c_float * 5)()
    nccl.ncclGroupStart()
    nccl.ncclSend(addr(out), 5, ncclFloat32, nxt, comm, None)
    nccl.ncclRecv(addr(inc), 5, ncclFloat32, prv, comm, None)
    nccl.ncclGroupEnd()
    assert list(inc) == [float(prv)] * 5, list(inc)
    # registration, as vLLM's symmetric-memory path does
    win = ncclWindow_t()
    nccl.ncclCommWindowRegister(comm, addr(x), ctypes.sizeof(x), ctypes.byref(win), 0)
    nccl.ncclCommWindowDeregister(comm, win)
    handle = buffer_type()
    nccl.ncclCommRegister(comm, addr(x), ctypes.sizeof(x), ctypes.byref(handle))
    nccl.ncclCommDeregister(comm, handle)
    # an error: a root out of range, with the last error naming it
    res = nccl.lib.ncclBroadcast(addr(b), addr(b), 3, ncclFloat32, n, comm, None)
    assert res == 4, res  # ncclInvalidArgument
    assert b"root" in nccl.lib.ncclGetLastError(comm)
    nccl.ncclCommDestroy(comm)
    print(f"PASS ctypes rank {rank}", flush=True)


if __name__ == "__main__":
    main()
