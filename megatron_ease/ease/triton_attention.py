"""Fused Triton kernels for the image-column attention slice (DESIGN §4), flash-attention style.

The same function as ``attention.image_attention_mass`` (whose ``impl`` argument dispatches
here), in the form DESIGN §4 calls cheap on a GPU: image columns plus the row log-sum-exp, with
nothing of size rows × keys ever in memory. Rows are the gathered response rows of
``response_row_index``; "allowed" keys are causal (key position <= row position) and valid.

Forward, one program per (sample, query head, block of response rows):

1. over the allowed key blocks, the row log-sum-exp, online (a flash forward without V);
2. over the image columns only, ``a_rj = exp(q_r·k_j·scale − lse_r)`` summed over the block's
   rows, written as partial column sums per (sample, head, row block) that torch reduces.

Backward, with ``u_j = ∂L/∂M_j`` at image columns (0 elsewhere) and ``c_r = Σ_j a_rj u_j``:

    dq_r = scale · Σ_{j allowed} a_rj (u_j − c_r) k_j
         = scale · [Σ_{j img} a_rj u_j k_j − c_r Σ_{j allowed} a_rj k_j]   (attention with V = K)
    dk_j = scale · Σ_{h in j's group} Σ_r a_rj (u_j − c_r) q_r

the flash-attention backward split: a dq kernel per row block (first ``c_r`` over the image
columns, then one pass over the allowed keys; ``u`` is a per-key scalar, so "dP" needs no V), and
a dk kernel per (key block, key head) that loops over the heads of its GQA group and the row
blocks that can see it.

Design choices:

- Image columns are *gathered* (positions of image ∧ valid keys per sample, padded), not masked:
  pass 2 and ``c_r`` then touch exactly the image keys, whether the image is one contiguous run
  (its gathered key rows are contiguous in memory anyway) or several images spread over the
  sequence, and a block never computes logits for text keys only to mask them.
- Loop bounds come from small ``[b, blocks]`` index tensors built in torch: a row block stops at
  its last row's position (causal), a key block's dk loop starts at the first row that can see
  it (``searchsorted``; rows are ascending), so no fully masked tile is computed.
- Determinism, run to run and bit for bit: every output element is written by exactly one
  program, which sums in a fixed loop order; the partial column sums are reduced by ``torch.sum``
  over a fixed-shape buffer; no atomics. Block sizes are fixed arguments, not autotuned: a
  timing-dependent choice could change the summation order between processes.
- Precision: logits ``q·k`` are fp32 (exact products of bf16/fp16 inputs, fp32 accumulation; fp32
  inputs use IEEE fp32 dots, not TF32). Probabilities, the LSE, column sums and ``c_r`` stay fp32.
  For bf16 inputs the fp32 gradient tiles ``a (u − c)`` are rounded to bf16 before their matmul
  with k or q (fp32 accumulation), as flash-attention backward does with dS; for fp16 they stay
  fp32 with TF32x3 dots, because fp16 would underflow the small ``a (u − c)`` of long rows.
- Rows are assumed in the ``response_row_index`` layout: each sample's valid slots first, at
  ascending positions (the dk loop bounds rely on it).
"""

import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["triton_image_attention_mass"]

_LOG2E = math.log2(math.e)


def triton_image_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    image_mask: torch.Tensor,
    key_valid_mask: torch.Tensor,
    softmax_scale: float,
    response_rows: tuple[torch.Tensor, torch.Tensor],
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """``image_attention_mass`` with fused Triton kernels; arguments already resolved by it.

    CUDA tensors (CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``). Nothing
    here waits for the device: the image-column index has a fixed size (s slots), and the row
    index (which does wait, for R) comes in built, shared by the layers of a micro-batch.

    Args:
        query: ``[b, h, s, d]`` bf16, fp16 or fp32, any strides (e.g. a permuted ``[s, b, h, d]``).
        key: ``[b, g, s, d]``, same dtype as ``query``.
        image_mask, key_valid_mask: ``[b, s]`` bool.
        softmax_scale: logit scale.
        response_rows: ``response_row_index(response_mask)``.
        block_m: response rows per tile; block_n: keys per tile (powers of two, >= 16).
        num_warps, num_stages: Triton launch options of all three kernels.

    Returns:
        ``[b, s]`` float32 mass, 0 at non-image columns; gradients reach query and key in their
        dtypes.
    """
    if query.dtype not in _DOT_PRECISION or key.dtype != query.dtype:
        raise ValueError(
            f"the Triton image-column slice takes bf16, fp16 or fp32 query and key of one dtype, "
            f"got {query.dtype} and {key.dtype}; use impl='torch' for other dtypes")
    if not query.is_cuda and type(_slice_fwd_kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            "the Triton image-column slice runs on CUDA tensors (CPU tensors only under Triton's "
            "interpreter: TRITON_INTERPRET=1 set before triton is first imported); got "
            f"{query.device}: use impl='torch' or 'auto'")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {size}")
    rows, row_valid = response_rows
    return _TritonImageAttentionMass.apply(
        query, key, image_mask, key_valid_mask, float(softmax_scale), rows, row_valid,
        (block_m, block_n, num_warps, num_stages),
    )


# tl.dot input_precision of (the logits q·k, the gradient tile · q or k), per input dtype; it only
# matters where both operands are fp32: logits under fp32 inputs, gradient dots under fp32/fp16.
_DOT_PRECISION = {
    torch.float32: ("ieee", "ieee"),
    torch.float16: ("tf32", "tf32x3"),
    torch.bfloat16: ("tf32", "tf32"),  # gradient tiles are rounded to bf16 instead
}


class _TritonImageAttentionMass(torch.autograd.Function):
    """Forward: LSE + image-column partial sums; backward: dq kernel, then dk kernel."""

    @staticmethod
    def forward(ctx, query, key, image_mask, key_valid_mask, scale, rows, row_valid, launch):
        block_m, block_n, num_warps, num_stages = launch
        b, num_heads, seq_len, head_dim = query.shape
        index = _SliceIndex.build(image_mask, key_valid_mask, rows, row_valid, block_m, block_n)
        lse = query.new_empty((b, num_heads, index.num_rows), dtype=torch.float32)  # log2 units
        partial = query.new_zeros(
            (b, num_heads, index.num_row_blocks, index.num_images), dtype=torch.float32
        )  # [b, h, row blocks, image slots]
        with _on_device(query):
            _slice_fwd_kernel[(index.num_row_blocks, b * num_heads)](
                query, key, index.key_valid, index.row_pos, index.image_pos, index.key_end,
                index.image_end, lse, partial,
                *query.stride(), *key.stride(),
                num_heads, num_heads // key.shape[1], seq_len, index.num_rows, index.num_images,
                index.num_row_blocks, head_dim, scale * _LOG2E,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
                LOGITS_PRECISION=_DOT_PRECISION[query.dtype][0],
                num_warps=num_warps, num_stages=num_stages,
            )
        columns = partial.flatten(1, 2).sum(dim=1)  # [b, image slots]
        ctx.save_for_backward(query, key, lse, *index[:_SliceIndex.NUM_TENSORS])
        ctx.index_sizes = index[_SliceIndex.NUM_TENSORS:]
        ctx.scale = scale
        ctx.launch = launch
        # Un-gather: non-image columns read the appended zero slot.
        return torch.gather(torch.nn.functional.pad(columns, (0, 1)), 1, index.image_slot)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mass):
        query, key, lse, *index_tensors = ctx.saved_tensors
        index = _SliceIndex(*index_tensors, *ctx.index_sizes)
        block_m, block_n, num_warps, num_stages = ctx.launch
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        b, num_heads, seq_len, head_dim = query.shape
        num_key_heads = key.shape[1]
        # where, not multiply: an upstream inf/NaN at a non-image column must not leak in.
        upstream = torch.where(index.image_columns, grad_mass.float(), 0.0).contiguous()  # [b, s]
        meta = dict(
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
            LOGITS_PRECISION=_DOT_PRECISION[query.dtype][0],
            GRAD_PRECISION=_DOT_PRECISION[query.dtype][1],
            ROUND_GRAD_TO_INPUT=query.dtype == torch.bfloat16,
            num_warps=num_warps, num_stages=num_stages,
        )
        row_dot = torch.empty_like(lse)  # [b, h, R] c_r, read by the dk kernel
        grad_query = torch.zeros_like(query) if need_dq else None  # rows not written stay 0
        dq_out = grad_query if need_dq else query  # an unused pointer when dq is not needed
        with _on_device(query):
            _slice_bwd_dq_kernel[(index.num_row_blocks, b * num_heads)](
                query, key, index.key_valid, upstream, index.row_pos, index.image_pos,
                index.key_end, index.image_end, lse, row_dot, dq_out,
                *query.stride(), *key.stride(), *dq_out.stride(),
                num_heads, num_heads // num_key_heads, seq_len, index.num_rows, index.num_images,
                index.num_row_blocks, head_dim, ctx.scale * _LOG2E, ctx.scale,
                WITH_DQ=need_dq, **meta,
            )
            grad_key = None
            if need_dk:
                grad_key = torch.empty_like(key)  # every key is written, 0 where no row sees it
                _slice_bwd_dk_kernel[(index.num_key_blocks, b * num_key_heads)](
                    query, key, index.key_valid, upstream, index.row_pos, index.row_start,
                    index.row_count, lse, row_dot, grad_key,
                    *query.stride(), *key.stride(), *grad_key.stride(),
                    num_heads, num_heads // num_key_heads, num_key_heads, seq_len, index.num_rows,
                    index.num_key_blocks, head_dim, ctx.scale * _LOG2E, ctx.scale,
                    **meta,
                )
        return grad_query, grad_key, None, None, None, None, None, None


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


class _SliceIndex(NamedTuple):
    """Gathered positions and per-block loop bounds, built once in forward, saved for backward.

    R is at least 1 (a padding slot) and J = s, so every launch has a grid and every pointer a
    buffer; building it never waits for the device.
    """

    row_pos: torch.Tensor  # [b, R] int32: each response-row slot's position, −1 for padding
    image_pos: torch.Tensor  # [b, J = s] int32: image ∧ valid columns, ascending, s after
    image_slot: torch.Tensor  # [b, s] int64: each column's slot in image_pos, J (a 0) if none
    image_columns: torch.Tensor  # [b, s] bool: image ∧ valid
    key_valid: torch.Tensor  # [b, s] int8
    key_end: torch.Tensor  # [b, row blocks] int32: 1 + last row position (causal end), 0 if none
    image_end: torch.Tensor  # [b, row blocks] int32: image slots before key_end
    row_start: torch.Tensor  # [b, key blocks] int32: first row slot at or after the block's start
    row_count: torch.Tensor  # [b] int32: valid row slots
    num_rows: int
    num_row_blocks: int
    num_images: int
    num_key_blocks: int

    NUM_TENSORS = 9

    @classmethod
    def build(cls, image_mask, key_valid_mask, rows, row_valid, block_m, block_n):
        b, seq_len = image_mask.shape
        int32 = dict(dtype=torch.int32, device=image_mask.device)
        num_rows = max(rows.shape[1], 1)
        num_row_blocks = triton.cdiv(num_rows, block_m)

        row_pos = torch.full((b, num_row_blocks * block_m), -1, **int32)
        row_pos[:, : rows.shape[1]] = torch.where(row_valid, rows, -1)
        key_end = row_pos.view(b, num_row_blocks, block_m).amax(dim=2) + 1
        row_pos = row_pos[:, :num_rows].contiguous()
        ascending_rows = torch.where(row_pos >= 0, row_pos, seq_len)
        key_block_starts = torch.arange(0, seq_len, block_n, **int32).expand(b, -1).contiguous()
        row_start = torch.searchsorted(ascending_rows, key_block_starts, out_int32=True)

        # Image slots without a host sync: J = s slots (an upper bound), each image column
        # scattered to its rank among the sample's image columns; the other slots keep the
        # padding position s and are never visited (loops stop at image_end).
        image_columns = image_mask & key_valid_mask
        num_images = seq_len
        image_slot = torch.where(image_columns, image_columns.cumsum(dim=1) - 1, num_images)
        image_pos = torch.full((b, num_images + 1), seq_len, **int32)  # + a discard slot
        positions = torch.arange(seq_len, **int32).expand(b, -1)
        image_pos = image_pos.scatter_(1, image_slot, positions)[:, :num_images].contiguous()
        return cls(
            row_pos=row_pos,
            image_pos=image_pos,
            image_slot=image_slot,
            image_columns=image_columns,
            # The kernels index it as a contiguous [b, s] array; .to() keeps a view's strides.
            key_valid=key_valid_mask.to(torch.int8).contiguous(),
            key_end=key_end,
            image_end=torch.searchsorted(image_pos, key_end, out_int32=True),
            row_start=row_start,
            row_count=row_valid.sum(dim=1, dtype=torch.int32),
            num_rows=num_rows,
            num_row_blocks=num_row_blocks,
            num_images=num_images,
            num_key_blocks=key_block_starts.shape[1],
        )


@triton.jit
def _load_rows(base, positions, valid, stride_s, stride_d, offs_d, head_dim):
    """Rows ``positions`` of one head's ``[s, d]`` matrix; 0 where not ``valid`` or past d."""
    ptrs = base + positions[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _store_rows(base, positions, valid, stride_s, stride_d, offs_d, head_dim, value):
    ptrs = base + positions[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d
    tl.store(ptrs, value, mask=valid[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _logits_log2(a, b, qk_scale_log2, LOGITS_PRECISION: tl.constexpr):
    """``a · bᵀ · scale · log2(e)`` in fp32: logits in base-2 units, for exp2."""
    return tl.dot(a, tl.trans(b), input_precision=LOGITS_PRECISION) * qk_scale_log2


@triton.jit
def _grad_dot(acc, grad, operand, GRAD_PRECISION: tl.constexpr,
              ROUND_GRAD_TO_INPUT: tl.constexpr):
    """``acc + grad · operand`` for an fp32 gradient tile and a q or k tile (input dtype)."""
    if ROUND_GRAD_TO_INPUT:
        acc = tl.dot(grad.to(operand.dtype), operand, acc)
    else:
        acc = tl.dot(grad, operand.to(tl.float32), acc, input_precision=GRAD_PRECISION)
    return acc


@triton.jit
def _slice_fwd_kernel(
    q_ptr, k_ptr, key_valid_ptr, row_pos_ptr, image_pos_ptr, key_end_ptr, image_end_ptr,
    lse_ptr, partial_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    num_heads, heads_per_group, seq_len, num_rows, num_images, num_row_blocks, head_dim,
    qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LOGITS_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_pos = tl.load(row_pos_ptr + b * num_rows + offs_m, mask=offs_m < num_rows, other=-1)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, row_pos, row_pos >= 0,
                   stride_qs, stride_qd, offs_d, head_dim)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + b * stride_kb + (h // heads_per_group) * stride_kh

    # Pass 1: online log-sum-exp over the allowed keys (log2 units).
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    key_end = tl.load(key_end_ptr + b * num_row_blocks + pid_m)
    for start in range(0, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        key_ok = tl.load(key_valid_ptr + b * seq_len + offs_n, mask=in_seq, other=0) != 0
        k = _load_rows(k_base, offs_n, in_seq, stride_ks, stride_kd, offs_d, head_dim)
        logits = _logits_log2(q, k, qk_scale_log2, LOGITS_PRECISION)  # [BLOCK_M, BLOCK_N]
        allowed = (offs_n[None, :] <= row_pos[:, None]) & key_ok[None, :]
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        # A row with no allowed key so far keeps max −inf; subtract 0 there, not −inf (NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), 1)
        row_max = new_max
    # Rows without any allowed key get lse 0: their probabilities are masked to 0 anyway.
    has_key = row_sum > 0
    lse = tl.where(has_key, row_max + tl.log2(tl.where(has_key, row_sum, 1.0)), 0.0)
    tl.store(lse_ptr + pid_bh * num_rows + offs_m, lse, mask=offs_m < num_rows)

    # Pass 2: probabilities of the image columns, summed over this block's rows.
    partial_base = partial_ptr + (pid_bh * num_row_blocks + pid_m) * num_images
    image_end = tl.load(image_end_ptr + b * num_row_blocks + pid_m)
    for start in range(0, image_end, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        image_pos = tl.load(image_pos_ptr + b * num_images + offs_j, mask=offs_j < num_images,
                            other=seq_len)
        k = _load_rows(k_base, image_pos, image_pos < seq_len, stride_ks, stride_kd, offs_d,
                       head_dim)
        logits = _logits_log2(q, k, qk_scale_log2, LOGITS_PRECISION)
        allowed = image_pos[None, :] <= row_pos[:, None]  # padding slots sit at s: never
        probs = tl.where(allowed, tl.exp2(logits - lse[:, None]), 0.0)
        tl.store(partial_base + offs_j, tl.sum(probs, 0), mask=offs_j < num_images)


@triton.jit
def _slice_bwd_dq_kernel(
    q_ptr, k_ptr, key_valid_ptr, upstream_ptr, row_pos_ptr, image_pos_ptr, key_end_ptr,
    image_end_ptr, lse_ptr, row_dot_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, heads_per_group, seq_len, num_rows, num_images, num_row_blocks, head_dim,
    qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LOGITS_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ROUND_GRAD_TO_INPUT: tl.constexpr, WITH_DQ: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_pos = tl.load(row_pos_ptr + b * num_rows + offs_m, mask=offs_m < num_rows, other=-1)
    row_ok = row_pos >= 0
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, row_pos, row_ok, stride_qs, stride_qd,
                   offs_d, head_dim)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(lse_ptr + pid_bh * num_rows + offs_m, mask=offs_m < num_rows, other=0.0)
    k_base = k_ptr + b * stride_kb + (h // heads_per_group) * stride_kh
    upstream_base = upstream_ptr + b * seq_len

    # c_r = Σ_{j img} a_rj u_j: what the normaliser takes back from every logit of row r.
    row_dot = tl.zeros([BLOCK_M], tl.float32)
    image_end = tl.load(image_end_ptr + b * num_row_blocks + pid_m)
    for start in range(0, image_end, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        image_pos = tl.load(image_pos_ptr + b * num_images + offs_j, mask=offs_j < num_images,
                            other=seq_len)
        is_image = image_pos < seq_len
        k = _load_rows(k_base, image_pos, is_image, stride_ks, stride_kd, offs_d, head_dim)
        upstream = tl.load(upstream_base + image_pos, mask=is_image, other=0.0)
        logits = _logits_log2(q, k, qk_scale_log2, LOGITS_PRECISION)
        allowed = image_pos[None, :] <= row_pos[:, None]
        probs = tl.where(allowed, tl.exp2(logits - lse[:, None]), 0.0)
        row_dot += tl.sum(probs * upstream[None, :], 1)
    tl.store(row_dot_ptr + pid_bh * num_rows + offs_m, row_dot, mask=offs_m < num_rows)

    if WITH_DQ:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        key_end = tl.load(key_end_ptr + b * num_row_blocks + pid_m)
        for start in range(0, key_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_seq = offs_n < seq_len
            key_ok = tl.load(key_valid_ptr + b * seq_len + offs_n, mask=in_seq, other=0) != 0
            k = _load_rows(k_base, offs_n, in_seq, stride_ks, stride_kd, offs_d, head_dim)
            upstream = tl.load(upstream_base + offs_n, mask=in_seq, other=0.0)
            logits = _logits_log2(q, k, qk_scale_log2, LOGITS_PRECISION)
            allowed = (offs_n[None, :] <= row_pos[:, None]) & key_ok[None, :]
            probs = tl.where(allowed, tl.exp2(logits - lse[:, None]), 0.0)
            grad_logits = probs * (upstream[None, :] - row_dot[:, None])  # [BLOCK_M, BLOCK_N]
            acc = _grad_dot(acc, grad_logits, k, GRAD_PRECISION, ROUND_GRAD_TO_INPUT)
        _store_rows(dq_ptr + b * stride_dqb + h * stride_dqh, row_pos, row_ok, stride_dqs,
                    stride_dqd, offs_d, head_dim, (acc * scale).to(dq_ptr.dtype.element_ty))


@triton.jit
def _slice_bwd_dk_kernel(
    q_ptr, k_ptr, key_valid_ptr, upstream_ptr, row_pos_ptr, row_start_ptr, row_count_ptr,
    lse_ptr, row_dot_ptr, dk_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    num_heads, heads_per_group, num_key_heads, seq_len, num_rows, num_key_blocks, head_dim,
    qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LOGITS_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ROUND_GRAD_TO_INPUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // num_key_heads
    g = pid_bg % num_key_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seq = offs_n < seq_len
    key_ok = tl.load(key_valid_ptr + b * seq_len + offs_n, mask=in_seq, other=0) != 0
    k = _load_rows(k_ptr + b * stride_kb + g * stride_kh, offs_n, in_seq, stride_ks, stride_kd,
                   offs_d, head_dim)  # [BLOCK_N, BLOCK_D]
    upstream = tl.load(upstream_ptr + b * seq_len + offs_n, mask=in_seq, other=0.0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row_start = tl.load(row_start_ptr + b * num_key_blocks + pid_n)  # rows before: all causal
    row_end = tl.load(row_count_ptr + b)
    for i in range(0, heads_per_group):
        h = g * heads_per_group + i
        q_base = q_ptr + b * stride_qb + h * stride_qh
        stats = (b * num_heads + h) * num_rows
        for start in range(row_start, row_end, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            in_rows = offs_m < row_end
            row_pos = tl.load(row_pos_ptr + b * num_rows + offs_m, mask=in_rows, other=-1)
            q = _load_rows(q_base, row_pos, row_pos >= 0, stride_qs, stride_qd, offs_d, head_dim)
            lse = tl.load(lse_ptr + stats + offs_m, mask=in_rows, other=0.0)
            row_dot = tl.load(row_dot_ptr + stats + offs_m, mask=in_rows, other=0.0)
            logits_t = _logits_log2(k, q, qk_scale_log2, LOGITS_PRECISION)  # [BLOCK_N, BLOCK_M]
            allowed = (offs_n[:, None] <= row_pos[None, :]) & key_ok[:, None]
            probs_t = tl.where(allowed, tl.exp2(logits_t - lse[None, :]), 0.0)
            grad_logits_t = probs_t * (upstream[:, None] - row_dot[None, :])
            acc = _grad_dot(acc, grad_logits_t, q, GRAD_PRECISION, ROUND_GRAD_TO_INPUT)
    _store_rows(dk_ptr + b * stride_dkb + g * stride_dkh, offs_n, in_seq, stride_dks, stride_dkd,
                offs_d, head_dim, (acc * scale).to(dk_ptr.dtype.element_ty))
