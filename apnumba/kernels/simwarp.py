"""Python stand-ins for the PTX intrinsics, used under the CUDA simulator.

The simulator runs every CUDA thread as a Python thread but has no warp-level
collectives (no shuffles, ballots or mma).  A collective here is a rendezvous:
each lane of the warp posts its operands, waits on a per-warp barrier, computes
its own share of the warp-wide result from everybody's operands, and waits once
more before the slots can be reused.  Results are bit-identical to the GPU's.
Only imported when ``NUMBA_ENABLE_CUDASIM=1``.
"""

import time
import threading
import weakref

import numpy as np

_registry_lock = threading.Lock()
_warps = weakref.WeakKeyDictionary()  # block manager -> {(block, warp): (barrier, slots)}


def _warp_exchange(value):
    """Post ``value`` for this lane; return the list of the warp's values, by lane."""
    thread = threading.current_thread()
    manager = thread._manager
    warp = thread.thread_id // 32
    with _registry_lock:
        per_block = _warps.setdefault(manager, {})
        key = (tuple(thread.blockIdx), warp)
        slot = per_block.get(key)
        if slot is None:
            threads = int(np.prod(manager._block_dim))
            lanes = min(32, threads - 32 * warp)
            if lanes != 32:
                raise RuntimeError("warp collectives need whole warps: make the block size a multiple of 32")
            slot = per_block[key] = (threading.Barrier(lanes), [None] * lanes)
    barrier, slots = slot
    slots[thread.thread_id % 32] = value
    barrier.wait()
    values = list(slots)
    barrier.wait()
    return values


def _lane():
    return threading.current_thread().thread_id % 32


def _popc_u32(x):
    return bin(int(x) & 0xFFFFFFFF).count("1")


_POPC8 = np.array([_popc_u32(i) for i in range(256)], dtype=np.int64)


def _popc_words(words):
    """Elementwise popcount of an array of 32-bit words."""
    w = np.asarray(words, dtype=np.int64) & 0xFFFFFFFF
    return sum(_POPC8[(w >> s) & 0xFF] for s in (0, 8, 16, 24))


def _m16n8_mma(product, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """One m16n8 mma with 8-word k-steps (b1 m16n8k256, int8 m16n8k32: the same fragments): the warp's
    fragments assembled into A (16 x 8 words), B (8 columns x 8 words), C; D = product(A, B) + C;
    this lane's four results."""
    lanes = _warp_exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
    A = np.zeros((16, 8), dtype=np.int64)
    B = np.zeros((8, 8), dtype=np.int64)  # B[col][word]
    C = np.zeros((16, 8), dtype=np.int64)
    for lane, (x0, x1, x2, x3, y0, y1, z0, z1, z2, z3) in enumerate(lanes):
        g, t = lane >> 2, lane & 3
        A[g, t], A[g + 8, t], A[g, 4 + t], A[g + 8, 4 + t] = x0, x1, x2, x3
        B[g, t], B[g, 4 + t] = y0, y1
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = z0, z1, z2, z3
    D = product(A & 0xFFFFFFFF, B & 0xFFFFFFFF) + C
    g, t = _lane() >> 2, _lane() & 3
    out = (D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1])
    return tuple(np.int32(np.int64(v).astype(np.int32)) for v in out)


def _mma_m16n8k256(op, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    def popc_product(A, B):
        combined = (A[:, None, :] & B[None, :, :]) if op == "and" else (A[:, None, :] ^ B[None, :, :])
        return _popc_words(combined).sum(axis=2)

    return _m16n8_mma(popc_product, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def _mma_m8n8k128(op, a, b, c0, c1):
    lanes = _warp_exchange((a, b, c0, c1))
    A = np.zeros((8, 4), dtype=np.int64)
    B = np.zeros((8, 4), dtype=np.int64)
    C = np.zeros((8, 8), dtype=np.int64)
    for lane, (x, y, z0, z1) in enumerate(lanes):
        g, t = lane >> 2, lane & 3
        A[g, t], B[g, t] = x, y
        C[g, 2 * t], C[g, 2 * t + 1] = z0, z1
    A &= 0xFFFFFFFF
    B &= 0xFFFFFFFF
    combined = (A[:, None, :] & B[None, :, :]) if op == "and" else (A[:, None, :] ^ B[None, :, :])
    D = _popc_words(combined).sum(axis=2) + C
    g, t = _lane() >> 2, _lane() & 3
    return np.int32(D[g, 2 * t]), np.int32(D[g, 2 * t + 1])


def _bytes(words, signed):
    """(rows, words) 32-bit words -> (rows, 4 * words) int64 bytes, little-endian (k = 4 * word + byte)."""
    b = (np.asarray(words, dtype=np.int64) & 0xFFFFFFFF).astype("<u4").view(np.uint8).astype(np.int64)
    return np.where(b >= 128, b - 256, b) if signed else b


def mma_m16n8k32_int8(types_ab):
    a_signed, b_signed = (t == "s8" for t in types_ab.split("."))

    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _m16n8_mma(lambda A, B: _bytes(A, a_signed) @ _bytes(B, b_signed).T,
                          a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    return mma


def mma_m16n8k256_and(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    return _mma_m16n8k256("and", a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def mma_m16n8k256_xor(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    return _mma_m16n8k256("xor", a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def mma_m8n8k128_and(a, b, c0, c1):
    return _mma_m8n8k128("and", a, b, c0, c1)


def mma_m8n8k128_xor(a, b, c0, c1):
    return _mma_m8n8k128("xor", a, b, c0, c1)


def popc32(x):
    return _popc_u32(x)


def _ldmatrix(count, smem, index):
    addresses = _warp_exchange(int(index))
    lane = _lane()
    row, word = lane >> 2, lane & 3
    return tuple(np.uint32(smem[addresses[8 * i + row] + word]).view(np.int32) for i in range(count))


def ldmatrix_x4(smem, index):
    return _ldmatrix(4, smem, index)


def ldmatrix_x2(smem, index):
    return _ldmatrix(2, smem, index)


def divmod_u32(a, b):
    return np.uint32(int(a) // int(b)), np.uint32(int(a) % int(b))


def divmod_magic(n, d, magic, shift):
    """The GPU's formula itself (so simulator runs check the magic numbers, not Python's //)."""
    q = ((2 * int(n) * (int(magic) & 0xFFFFFFFF)) >> 32) >> int(shift)
    return np.uint32(q), np.uint32(int(n) - q * int(d))


def ld_shared(smem, index):
    return smem[index]


def ld_shared_v4(smem, index):
    return tuple(np.uint32(smem[index + i]).view(np.int32) for i in range(4))


def st_global_v4(array, index, v0, v1, v2, v3):
    for i, v in enumerate((v0, v1, v2, v3)):
        array[index + i] = v


st_global_cs_v4 = st_global_v4


def st_global_v2(array, index, v0, v1):
    array[index] = v0
    array[index + 1] = v1


st_global_cs_v2 = st_global_v2


def ld_global_cg_v4(array, index):
    return tuple(np.int32(array[index + i]) for i in range(4))  # (an int32 workspace)


def st_shared(smem, index, value):
    smem[index] = np.int32(value).view(np.uint32)


def st_shared_v2(smem, index, v0, v1):
    smem[index] = v0
    smem[index + 1] = v1


def smem_addr(smem, index):
    """The simulator's shared "address" of ``smem[index]``: its byte offset in ``smem``."""
    return 4 * index


def cp_async_16(smem, smem_address, gmem, gmem_index, src_bytes):
    for i in range(4):
        smem[smem_address // 4 + i] = gmem[gmem_index + i] if 4 * i < src_bytes else 0


def cp_async_4(smem, smem_address, gmem, gmem_index, src_bytes):
    smem[smem_address // 4] = gmem[gmem_index] if src_bytes else 0


def cp_async_commit():
    pass


def fence_acq_rel_gpu():
    """The simulator's threads share one memory: nothing to order."""


def cp_async_wait(pending):
    """Copies above are synchronous: waiting is a no-op."""

    def wait():
        pass

    return wait


def ballot(predicate):
    votes = _warp_exchange(bool(predicate))
    return np.uint32(sum(1 << lane for lane, v in enumerate(votes) if v))


def shfl_idx(value, src_lane):
    values = _warp_exchange(int(value))
    return np.int32(values[int(src_lane) % 32])


def f32_div_rn(x, y):
    return np.float32(x) / np.float32(y)


def f32_mul_rn(x, y):
    return np.float32(np.float32(x) * np.float32(y))


def f32_add_rn(x, y):
    return np.float32(np.float32(x) + np.float32(y))


def f32_rint(x):
    return np.rint(np.float32(x))


def _no_wgmma(*args):
    raise NotImplementedError("wgmma (warpgroup tensor-core products) has no CUDA-simulator fallback: "
                              "use a TileConfig without wgmma in the simulator")


def wgmma_b1(n):
    return _no_wgmma


wgmma_fence = wgmma_commit = fence_proxy_async = smem_desc = _no_wgmma


def wgmma_wait(pending):
    return _no_wgmma


def zeros_i32(n):
    return _no_wgmma


def pin_registers(n):
    return _no_wgmma


def tuple_into(array, start, values):
    flat = array.reshape(-1)
    for k, v in enumerate(values):
        flat[start + k] = v


def global_timer_ns():
    return time.monotonic_ns()


def sm_count():
    return 8  # (any number: blocks 1, 3, 5, 7 of a staggered grid wait)


def sleep_ns(ns):
    time.sleep(ns * 1e-9)
