"""The Triton programs behind ``sparse24``'s launchers (``dense4_matmul``, ``slim24_matmul``).

The storage, the two paths (GEMV-style for M <= ``SMALL_M``, ``tl.dot`` tiles above) and where
the scales apply are described in ``sparse24``; the launchers there check every argument before
any of these programs runs.
"""

import triton
import triton.language as tl

SMALL_M = 8  # batches up to this use the GEMV-style path

# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _acc_dense4(
    acc,
    a_ptr,
    stride_am,
    offs_m,
    M,
    w_ptr,
    stride_wn,
    s_ptr,
    stride_sn,
    ins_ptr,
    offs_n,
    N,
    KDIM,
    GROUP,
    HAS_INS: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc (BM, BN) += a (M, KDIM) @ dequant(W (N, KDIM))^T: nibbles, scales
    (N, ceil(KDIM/GROUP)), optional column divisor ins (KDIM,)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)  # int64 offsets: M x stride overflows int32 past ~2^31
    rows_m = offs_m.to(tl.int64)
    n_bytes = (KDIM + 1) // 2
    for kb in range(0, n_bytes, BLOCK_KB):
        offs_b = kb + tl.arange(0, BLOCK_KB)  # (BKB,) byte = columns 2b (low), 2b+1 (high)
        k_lo = offs_b * 2
        k_hi = k_lo + 1
        ok_lo = k_lo < KDIM
        ok_hi = k_hi < KDIM  # the high nibble of an odd row's last byte is padding
        wmask = mask_n[:, None] & ok_lo[None, :]
        wb = tl.load(w_ptr + rows_n[:, None] * stride_wn + offs_b[None, :], mask=wmask, other=0).to(
            tl.int32
        )  # (BN, BKB)
        q_lo = ((wb & 0xF) ^ 8) - 8  # sign-extend two's-complement nibbles
        q_hi = ((wb >> 4) ^ 8) - 8
        s_row = s_ptr + rows_n[:, None] * stride_sn
        s_lo = tl.load(s_row + (k_lo // GROUP)[None, :], mask=wmask, other=0.0).to(tl.float32)
        s_hi = tl.load(
            s_row + (k_hi // GROUP)[None, :], mask=mask_n[:, None] & ok_hi[None, :], other=0.0
        ).to(tl.float32)
        w_lo = q_lo.to(tl.float32) * s_lo  # (BN, BKB)
        w_hi = q_hi.to(tl.float32) * s_hi
        if HAS_INS:
            w_lo = w_lo / tl.load(ins_ptr + k_lo, mask=ok_lo, other=1.0).to(tl.float32)[None, :]
            w_hi = w_hi / tl.load(ins_ptr + k_hi, mask=ok_hi, other=1.0).to(tl.float32)[None, :]
        a_row = a_ptr + rows_m[:, None] * stride_am
        a_lo = tl.load(a_row + k_lo[None, :], mask=mask_m[:, None] & ok_lo[None, :], other=0.0)
        a_hi = tl.load(a_row + k_hi[None, :], mask=mask_m[:, None] & ok_hi[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(a_lo, tl.trans(w_lo.to(a_lo.dtype)), input_precision=PREC)
            acc += tl.dot(a_hi, tl.trans(w_hi.to(a_hi.dtype)), input_precision=PREC)
        else:
            prod = a_lo.to(tl.float32)[:, None, :] * w_lo[None, :, :]  # (BM, BN, BKB)
            prod += a_hi.to(tl.float32)[:, None, :] * w_hi[None, :, :]
            acc += tl.sum(prod, axis=2)
    return acc


@triton.jit
def _dense4_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    ins_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    GROUP,
    HAS_INS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _acc_dense4(
        acc,
        x_ptr,
        stride_xm,
        offs_m,
        M,
        w_ptr,
        stride_wn,
        s_ptr,
        stride_sn,
        ins_ptr,
        offs_n,
        N,
        K,
        GROUP,
        HAS_INS,
        BLOCK_KB,
        USE_DOT,
        PREC,
    )
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _slim24_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    s_ptr,
    ins_ptr,
    t_ptr,
    rv_ptr,
    rs_ptr,
    rins_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_vn,
    stride_metan,
    stride_sn,
    stride_tm,
    stride_rvn,
    stride_rsn,
    stride_ym,
    W_GROUP,
    R_GROUP,
    SCALE_MODE: tl.constexpr,  # 0: per-tensor, on the accumulator; 1: grouped, per element
    HAS_IN_SCALE: tl.constexpr,
    HAS_ADAPTER: tl.constexpr,
    HAS_R_INS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_RB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)  # int64 offsets: M x stride overflows int32 past ~2^31
    rows_n = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_groups = K // 4
    for g0 in range(0, n_groups, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)  # (BG,) groups of 4 columns
        nmask = mask_n[:, None] & (offs_g < n_groups)[None, :]  # (BN, BG)
        vb = tl.load(v_ptr + rows_n[:, None] * stride_vn + offs_g[None, :], mask=nmask, other=0).to(
            tl.int32
        )  # one byte = the group's two kept codes
        mb = tl.load(
            meta_ptr + rows_n[:, None] * stride_metan + (offs_g // 2)[None, :], mask=nmask, other=0
        ).to(tl.int32)  # one byte = positions of groups 2i, 2i+1
        nib = (mb >> ((offs_g & 1) * 4)[None, :]) & 0xF
        p0 = nib & 3
        p1 = nib >> 2
        w0 = (((vb & 0xF) ^ 8) - 8).to(tl.float32)  # (BN, BG)
        w1 = (((vb >> 4) ^ 8) - 8).to(tl.float32)
        col0 = offs_g[None, :] * 4 + p0  # (BN, BG) column of each kept value
        col1 = offs_g[None, :] * 4 + p1
        if SCALE_MODE == 1:
            s = tl.load(
                s_ptr + rows_n[:, None] * stride_sn + (offs_g * 4 // W_GROUP)[None, :],
                mask=nmask,
                other=0.0,
            ).to(tl.float32)
            w0 = w0 * s
            w1 = w1 * s
        if HAS_IN_SCALE:
            w0 = w0 / tl.load(ins_ptr + col0, mask=nmask, other=1.0).to(tl.float32)
            w1 = w1 / tl.load(ins_ptr + col1, mask=nmask, other=1.0).to(tl.float32)
        if USE_DOT:
            # expand the 2:4 tile to dense, one position j of every group per dot
            for j in tl.static_range(4):
                wj = tl.where(p0 == j, w0, 0.0) + tl.where(p1 == j, w1, 0.0)  # (BN, BG)
                xj = tl.load(
                    x_ptr + rows_m[:, None] * stride_xm + (offs_g * 4 + j)[None, :],
                    mask=mask_m[:, None] & (offs_g < n_groups)[None, :],
                    other=0.0,
                )  # (BM, BG)
                acc += tl.dot(xj, tl.trans(wj.to(xj.dtype)), input_precision=PREC)
        else:
            # each kept value's index picks its activation: x[m, col]
            x_row = x_ptr + rows_m[:, None, None] * stride_xm
            xmask = mask_m[:, None, None] & nmask[None, :, :]
            x0 = tl.load(x_row + col0[None, :, :], mask=xmask, other=0.0).to(tl.float32)
            x1 = tl.load(x_row + col1[None, :, :], mask=xmask, other=0.0).to(tl.float32)
            acc += tl.sum(x0 * w0[None, :, :] + x1 * w1[None, :, :], axis=2)  # (BM, BN)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    if HAS_ADAPTER:
        # the adapter's second matmul as extra reduction steps: acc += t (M, R) @ dq(R^T)^T
        acc = _acc_dense4(
            acc,
            t_ptr,
            stride_tm,
            offs_m,
            M,
            rv_ptr,
            stride_rvn,
            rs_ptr,
            stride_rsn,
            rins_ptr,
            offs_n,
            N,
            R,
            R_GROUP,
            HAS_R_INS,
            BLOCK_RB,
            USE_DOT,
            PREC,
        )
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
