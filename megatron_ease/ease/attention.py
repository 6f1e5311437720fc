"""Image-column slice of the attention softmax for the EASE loss (DESIGN §4).

    a[b, h, r, j] = softmax over allowed j of (q[b, h, r] · k[b, g(h), j] · scale)
    M[b, j]       = Σ_h Σ_{response rows r} a[b, h, r, j] · image[b, j]

The slice is exact: the softmax is normalised over *all* allowed keys (causal ∧ valid) and the
gradient flows through that normaliser. It is also cheap in memory: only the response rows are
gathered, they are processed ``chunk_size`` rows at a time, and backward recomputes the logits of
each chunk from q, k and the saved per-row log-sum-exp instead of keeping probabilities. Nothing of
size b·h·s·s is built, and nothing of size b·h·R·s is kept for backward.

Backward, with u_j = ∂L/∂M_j at image columns (0 elsewhere) and c_r = Σ_j a_rj u_j:

    ∂L/∂logit_rj = a_rj · (u_j − c_r)
    ∂L/∂q_r      = scale · Σ_j a_rj (u_j − c_r) k_j
    ∂L/∂k_j      = scale · Σ_r a_rj (u_j − c_r) q_r

The −c_r · Σ_j a_rj k_j part is the normaliser's gradient: attention with V = K over all allowed
keys. The fused GPU kernels of ``triton_attention`` (``impl="triton"`` / ``"auto"``) split it off:
image columns only + one flash-attention-like pass with V = K; on a dense chunk the single matmul
against ``a · (u − c)`` is the same arithmetic with fewer passes.
"""

import contextlib
import functools
import importlib.util
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["image_attention_mass", "response_row_index"]


def image_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    image_mask: torch.Tensor,
    response_mask: torch.Tensor,
    softmax_scale: Optional[float] = None,
    key_valid_mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    response_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Attention mass that response rows put on each image column, summed over the given heads.

    Args:
        query: ``[b, h, s, d]`` queries after rotary.
        key: ``[b, g, s, d]`` keys after rotary; query head ``i`` reads key head ``i // (h / g)``.
        image_mask: ``[b, s]`` bool, True at visual tokens.
        response_mask: ``[b, s]`` bool, True at response rows: the label-shifted mask that selects
            the response log-probs (the last prompt position is a response row). Rows are taken as
            given, padding included; a row with no allowed key contributes 0.
        softmax_scale: logit scale, ``1/sqrt(d)`` by default.
        key_valid_mask: ``[b, s]`` bool, True at real tokens, False at padding (all valid if None).
        chunk_size: response rows processed at once; None = all of them in one chunk. It bounds
            the working memory (2–3 tensors of b·h·chunk_size·s floats) and changes no value or
            gradient beyond floating-point summation order.
        response_rows: ``response_row_index(response_mask)``, when the caller shares it between
            layers (building it sorts the mask and waits for the device); None = built here.
        impl: ``"torch"`` (this module's chunked path), ``"triton"`` (the fused kernels of
            ``triton_attention``: bf16/fp16/fp32 inputs of one dtype; ``chunk_size`` is ignored,
            tiles are the kernels' business) or ``"auto"``: Triton for CUDA tensors of those
            dtypes when triton is installed, else torch. Both give the same values and gradients
            up to floating-point summation order. The default stays ``"torch"`` (config
            ``ease.slice_impl``) until the kernels, verified in Triton's CPU interpreter, have
            been run compiled on a GPU.

    Returns:
        ``[b, s]`` float32 (float64 for float64 inputs) mass, 0 at non-image columns. Gradients
        reach ``query`` and ``key`` in their own dtypes; the math runs in at least float32.
    """
    _check_inputs(query, key, image_mask, response_mask, key_valid_mask, chunk_size)
    if key_valid_mask is None:
        key_valid_mask = torch.ones_like(image_mask)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(query.shape[-1])
    rows, row_valid = (response_row_index(response_mask) if response_rows is None
                       else response_rows)
    if _use_triton(impl, query, key):
        return _triton_attention().triton_image_attention_mass(
            query, key, image_mask, key_valid_mask, softmax_scale, (rows, row_valid)
        )
    return _ImageAttentionMass.apply(
        query, key, image_mask, response_mask, key_valid_mask, float(softmax_scale), chunk_size,
        rows, row_valid
    )


_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _use_triton(impl: str, query: torch.Tensor, key: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    # The kernels' dot precisions (tf32 / tf32x3) are NVIDIA's, from Ampere on: on ROCm (where
    # ``is_cuda`` is True too) Triton refuses to compile them; auto leaves older GPUs to torch.
    rocm = torch.version.hip is not None
    if impl == "auto":
        return (query.is_cuda and not rocm and query.dtype in _TRITON_DTYPES
                and key.dtype == query.dtype and _triton_attention() is not None
                and torch.cuda.get_device_capability(query.device) >= (8, 0))
    if impl == "triton":
        if rocm:
            raise NotImplementedError(
                "image_attention_mass(impl='triton'): the kernels are written for NVIDIA GPUs "
                "(tf32 dots), not ROCm; use impl='torch' or 'auto' (ease.slice_impl)")
        if _triton_attention() is None:
            raise ImportError(
                "image_attention_mass(impl='triton') needs the triton package (pip install "
                "triton, or the 'dev' extra); use impl='torch' or 'auto' without it")
        return True
    raise ValueError(
        f"image_attention_mass: impl must be 'auto', 'torch' or 'triton', got {impl!r}")


@functools.cache
def _triton_attention():
    """The Triton module, or None without triton: imported on first use, so that triton stays
    optional and CPU-only callers never import it."""
    if importlib.util.find_spec("triton") is None:
        return None
    from megatron_ease.ease import triton_attention

    return triton_attention


class _ImageAttentionMass(torch.autograd.Function):
    """Chunked forward, recompute-in-backward; see the module docstring for the gradient."""

    @staticmethod
    def forward(ctx, query, key, image_mask, response_mask, key_valid_mask, scale, chunk_size,
                rows, row_valid):
        with _matmul_precision(query):
            return _ImageAttentionMass._forward(ctx, query, key, image_mask, response_mask,
                                                key_valid_mask, scale, chunk_size, rows,
                                                row_valid)

    @staticmethod
    def _forward(ctx, query, key, image_mask, response_mask, key_valid_mask, scale, chunk_size,
                 rows, row_valid):
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        b, _, s, _ = query.shape
        query_groups = _group_query_heads(query, key.shape[1])  # [b, g, n, s, d]
        key_c = key.to(compute_dtype)  # [b, g, s, d]
        mass = query.new_zeros((b, s), dtype=compute_dtype)  # [b, s]
        lse_chunks = []
        for start, stop in _chunks(rows.shape[1], chunk_size):
            _, logits = _chunk_logits(
                query_groups, key_c, rows[:, start:stop], row_valid[:, start:stop],
                key_valid_mask, scale,
            )  # [b, g, n, c, s]
            lse = _safe_logsumexp(logits)  # [b, g, n, c]
            probs = logits.sub_(lse.unsqueeze(-1)).exp_()
            mass += probs.sum(dim=(1, 2, 3))
            lse_chunks.append(lse)

        lse = torch.cat(lse_chunks, dim=-1) if lse_chunks else mass.new_zeros((b, 0))
        # The row index ([b, R] int64, small) is kept rather than rebuilt in backward.
        ctx.save_for_backward(query, key, image_mask, response_mask, key_valid_mask, lse, rows,
                              row_valid)
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        return torch.where(image_mask, mass, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mass):
        with _matmul_precision(ctx.saved_tensors[0]):
            return _ImageAttentionMass._backward(ctx, grad_mass)

    @staticmethod
    def _backward(ctx, grad_mass):
        (query, key, image_mask, response_mask, key_valid_mask, lse, rows,
         row_valid) = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        scale = ctx.scale
        g = key.shape[1]
        query_groups = _group_query_heads(query, g)  # [b, g, n, s, d]
        b, _, n, s, d = query_groups.shape
        key_c = key.to(compute_dtype)  # [b, g, s, d]
        # where, not multiply: an upstream inf/NaN at a non-image column must not leak in.
        upstream = torch.where(image_mask, grad_mass.to(compute_dtype), 0.0)  # [b, s]

        grad_query = (
            query.new_zeros(query_groups.shape, dtype=compute_dtype) if need_dq else None
        )  # [b, g, n, s, d]
        grad_key = torch.zeros_like(key_c) if need_dk else None
        for start, stop in _chunks(rows.shape[1], ctx.chunk_size):
            rows_c = rows[:, start:stop]  # [b, c]
            c = rows_c.shape[1]
            query_c, logits = _chunk_logits(
                query_groups, key_c, rows_c, row_valid[:, start:stop], key_valid_mask, scale,
            )  # [b, g, n, c, d], [b, g, n, c, s]
            probs = logits.sub_(lse[..., start:stop].unsqueeze(-1)).exp_()
            # c_r = Σ_j a_rj u_j: what the normaliser takes back from every logit of row r.
            row_dot = torch.matmul(probs.view(b, g * n * c, s), upstream.unsqueeze(-1))
            row_dot = row_dot.view(b, g, n, c, 1)
            grad_logits = probs.mul_(upstream[:, None, None, None, :] - row_dot)
            grad_logits = grad_logits.view(b, g, n * c, s)  # [b, g, n·c, s]
            if need_dq:
                grad_query_c = torch.matmul(grad_logits, key_c).mul_(scale)  # [b, g, n·c, d]
                # scatter_add: rows beyond a sample's count alias real positions but carry zeros.
                index = rows_c[:, None, None, :, None].expand(b, g, n, c, d)
                grad_query.scatter_add_(3, index, grad_query_c.view(b, g, n, c, d))
            if need_dk:
                grad_key += torch.matmul(
                    grad_logits.transpose(-1, -2), query_c.view(b, g, n * c, d)
                ).mul_(scale)

        if need_dq:
            grad_query = grad_query.flatten(1, 2).to(query.dtype)  # [b, h, s, d]
        if need_dk:
            grad_key = grad_key.to(key.dtype)
        return grad_query, grad_key, None, None, None, None, None, None, None


@contextlib.contextmanager
def _matmul_precision(query: torch.Tensor):
    """TF32 tensor cores for the float32 matmuls when the inputs are bf16/fp16 on a GPU.

    A bf16 (fp16) value is exact in TF32, so the logits ``q · k`` are the exact fp32 dot products
    either way; only the backward products of fp32 probabilities with q or k round an operand to
    TF32 (2^-11 relative), below the bf16 rounding of the gradients returned. Float32 inputs keep
    full float32 matmuls (whatever the global setting), so fp32 results stay fp32-exact."""
    if not query.is_cuda:
        yield
        return
    try:
        previous = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        # The process set TF32 through torch's newer fp32_precision settings, and torch refuses
        # the legacy flag once both were used: leave that setting as it is.
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = query.dtype in (torch.bfloat16, torch.float16)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _group_query_heads(query: torch.Tensor, num_key_heads: int) -> torch.Tensor:
    """[b, h, s, d] -> [b, g, h/g, s, d]: each key head meets its query group in one matmul,
    so keys are never repeated in memory."""
    return query.unflatten(1, (num_key_heads, query.shape[1] // num_key_heads))


def response_row_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of response rows, left-aligned and padded to the batch maximum R.

    Returns ``rows [b, R]`` (int64 positions, ascending) and ``row_valid [b, R]``. Padding slots
    point at some non-response position; they are masked out through ``row_valid``.
    """
    counts = response_mask.sum(dim=1)  # [b]
    num_rows = int(counts.max()) if counts.numel() else 0
    # A stable sort of "not response" puts each sample's response positions first, in order.
    rows = torch.argsort((~response_mask).to(torch.uint8), dim=1, stable=True)[:, :num_rows]
    row_valid = torch.arange(num_rows, device=rows.device) < counts.unsqueeze(1)
    return rows, row_valid


def _chunks(num_rows: int, chunk_size: Optional[int]):
    step = num_rows if chunk_size is None else chunk_size
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, max(step, 1))]


def _chunk_logits(query_groups, key_c, rows_c, row_valid_c, key_valid_mask, scale):
    """Masked logits of one chunk of response rows.

    Returns the gathered queries ``[b, g, n, c, d]`` (compute dtype) and logits
    ``[b, g, n, c, s]`` with −inf at disallowed keys (future, padding, or a padding row slot).
    """
    b, g, n, s, d = query_groups.shape
    c = rows_c.shape[1]
    index = rows_c[:, None, None, :, None].expand(b, g, n, c, d)
    query_c = torch.gather(query_groups, 3, index).to(key_c.dtype)  # [b, g, n, c, d]
    logits = torch.matmul(query_c.view(b, g, n * c, d), key_c.transpose(-1, -2))  # [b, g, n·c, s]
    logits = logits.mul_(scale).view(b, g, n, c, s)
    positions = torch.arange(s, device=rows_c.device)
    allowed = (
        (positions <= rows_c.unsqueeze(-1))
        & key_valid_mask.unsqueeze(1)
        & row_valid_c.unsqueeze(-1)
    )  # [b, c, s]
    logits.masked_fill_(~allowed[:, None, None], float("-inf"))
    return query_c, logits


def _safe_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp; 0 for rows without any allowed key so that exp(−inf − lse) = 0, not NaN."""
    lse = torch.logsumexp(logits, dim=-1)
    return torch.where(torch.isfinite(lse), lse, 0.0)


def _check_inputs(query, key, image_mask, response_mask, key_valid_mask, chunk_size):
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"image_attention_mass expects query [b, h, s, d] and key [b, g, s, d], got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    b, h, s, d = query.shape
    if key.shape[0] != b or key.shape[2:] != (s, d):
        raise ValueError(
            f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in b, s or d"
        )
    if h % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({h}) must be a multiple of key heads ({key.shape[1]}) for GQA"
        )
    masks = {"image_mask": image_mask, "response_mask": response_mask}
    if key_valid_mask is not None:
        masks["key_valid_mask"] = key_valid_mask
    for name, mask in masks.items():
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, s):
            raise ValueError(
                f"{name} must be a bool tensor of shape {(b, s)}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
