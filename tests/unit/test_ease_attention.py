"""image_attention_mass against a naive float64 full-softmax reference (DESIGN §4)."""

import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ease.ease.attention import image_attention_mass


def naive_image_attention_mass(query, key, image_mask, response_mask, scale=None, valid=None):
    """Full [b, h, s, s] softmax over causal ∧ valid keys, image columns, summed over heads/rows."""
    b, h, s, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = torch.ones_like(image_mask) if valid is None else valid
    key = key.repeat_interleave(h // key.shape[1], dim=1)  # [b, h, s, d]
    logits = torch.einsum("bhrd,bhjd->bhrj", query, key) * scale  # [b, h, s, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = causal[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)  # rows with no key: 0, not NaN
    probs = probs * response_mask[:, None, :, None]
    return probs.sum(dim=(1, 2)) * image_mask


def make_case(b=2, h=4, g=2, s=13, d=8, padding="right", dtype=torch.float64, seed=0):
    """Random q/k and masks shaped like a packed VL batch: prompt with an image, then a response."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64).to(dtype)
    key = torch.randn(b, g, s, d, generator=gen, dtype=torch.float64).to(dtype)
    valid = torch.ones(b, s, dtype=torch.bool)
    image = torch.zeros(b, s, dtype=torch.bool)
    response = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        length = s - 3 * i  # samples of different lengths so padding really happens
        start = 0 if padding == "right" else s - length
        valid[i, start + length :] = False
        valid[i, :start] = False
        image[i, start + 1 : start + 1 + length // 3] = True
        prompt_end = start + length // 2
        # label-shifted: the last prompt position predicts the first response token
        response[i, prompt_end - 1 : start + length - 1] = True
    return query, key, image, response, valid


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def run_both(query, key, image, response, valid, scale=None, chunk_size=None, upstream_seed=1):
    """Values and q/k gradients of the function and of the reference (reference in float64)."""
    upstream = torch.randn(image.shape, generator=torch.Generator().manual_seed(upstream_seed),
                           dtype=torch.float64)
    q, k = leaf(query), leaf(key)
    mass = image_attention_mass(q, k, image, response, softmax_scale=scale,
                                key_valid_mask=valid, chunk_size=chunk_size)
    (mass.double() * upstream).sum().backward()
    q_ref, k_ref = leaf(query.double()), leaf(key.double())
    mass_ref = naive_image_attention_mass(q_ref, k_ref, image, response, scale, valid)
    (mass_ref * upstream).sum().backward()
    return (mass, q.grad, k.grad), (mass_ref, q_ref.grad, k_ref.grad)


def assert_matches(ours, ref, rtol, atol):
    for name, x, y in zip(("mass", "grad_query", "grad_key"), ours, ref):
        torch.testing.assert_close(
            x.double(), y, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("num_heads,num_key_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_matches_full_softmax_reference_in_float64(num_heads, num_key_heads, padding):
    case = make_case(h=num_heads, g=num_key_heads, padding=padding)
    ours, ref = run_both(*case, chunk_size=3)
    assert_matches(ours, ref, rtol=1e-8, atol=1e-12)
    assert ours[0].dtype == torch.float64
    assert (ours[0][~case[2]] == 0).all(), "non-image columns must be exactly 0"


def test_custom_softmax_scale():
    case = make_case(h=4, g=1)
    ours, ref = run_both(*case, scale=0.37, chunk_size=2)
    assert_matches(ours, ref, rtol=1e-8, atol=1e-12)


def test_gradient_flows_through_the_normaliser_to_non_image_keys():
    query, key, image, response, valid = make_case()
    _, grad_key = run_both(query, key, image, response, valid)[0][1:]
    # Non-image keys that some response row can see change the softmax denominator, so they
    # must get a gradient.
    last_row = torch.where(response, torch.arange(response.shape[1]), -1).amax(dim=1)  # [b]
    seen = valid & (torch.arange(response.shape[1]) <= last_row[:, None])
    assert grad_key.abs().sum(dim=(1, 3))[~image & seen].min() > 0


def test_results_do_not_depend_on_chunk_size():
    case = make_case(b=3, h=4, g=2, s=17, padding="left")
    num_rows = int(case[3].sum(1).max())
    results = [run_both(*case, chunk_size=c)[0] for c in (1, 3, None, num_rows + 5)]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-2, 4e-3)]
)
def test_low_precision_inputs_compute_in_float32(dtype, rtol, atol):
    case = make_case(h=4, g=2, dtype=dtype)
    ours, ref = run_both(*case, chunk_size=4)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    # The reference sees the same rounded inputs in float64, so only our arithmetic (and, for
    # bf16, the rounding of the returned gradients) differs.
    assert_matches(ours, ref, rtol=rtol, atol=atol)


def test_saved_tensors_hold_nothing_of_attention_size():
    b, h, g, s, d = 2, 4, 2, 24, 4
    query, key, image, response, valid = make_case(b=b, h=h, g=g, s=s, d=d)
    num_rows = int(response.sum(1).max())
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    q, k = leaf(query), leaf(key)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mass = image_attention_mass(q, k, image, response, key_valid_mask=valid)
    mass.sum().backward()
    assert saved, "the hook saw no saved tensor"
    # q and k themselves are the largest things allowed; anything of size b·h·R·s (the
    # probabilities of the response rows), let alone b·h·s·s, means backward is not recomputing.
    assert max(saved) <= max(q.numel(), k.numel())
    assert max(saved) < b * h * num_rows * s


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_builds_a_full_attention_matrix():
    b, h, g, s, d, chunk = 1, 4, 2, 48, 4, 4
    query, key, image, response, valid = make_case(b=b, h=h, g=g, s=s, d=d)
    q, k = leaf(query), leaf(key)
    with _LargestTensor() as mode:
        mass = image_attention_mass(q, k, image, response, key_valid_mask=valid, chunk_size=chunk)
        mass.sum().backward()
    # Working set per chunk is b·h·chunk·s; q, k and their gradients are b·h·s·d.
    assert mode.largest <= max(b * h * chunk * s, q.numel())
    assert mode.largest < b * h * s * s // 4


def test_rows_without_any_allowed_key_give_zero_and_no_nan():
    query, key, image, response, valid = make_case(b=2, s=10, padding="left")
    # Row 1 is left-padded by 3: mark its padded positions as response rows. They see no valid
    # key at all (causal ∧ valid is empty), so they must contribute 0 and no NaN.
    response = response.clone()
    response[1, :3] = True
    ours, ref = run_both(query, key, image, response, valid, chunk_size=2)
    for x in ours:
        assert torch.isfinite(x).all()
    assert_matches(ours, ref, rtol=1e-8, atol=1e-12)
    # A sample that is padding everywhere contributes nothing either.
    valid[0] = False
    mass = image_attention_mass(leaf(query), key, image, response, key_valid_mask=valid)
    assert (mass[0] == 0).all() and torch.isfinite(mass).all()


def test_padded_response_rows_are_taken_as_given():
    query, key, image, response, valid = make_case(b=2, s=12, padding="right")
    response = response | ~valid  # right-padding rows see every valid key: they do count
    ours, ref = run_both(query, key, image, response, valid, chunk_size=5)
    assert_matches(ours, ref, rtol=1e-8, atol=1e-12)


def test_no_response_rows_gives_zero_mass_and_gradient():
    query, key, image, _, valid = make_case()
    response = torch.zeros_like(image)
    ours, _ = run_both(query, key, image, response, valid)
    for x in ours:
        assert (x == 0).all()


def test_gradcheck_float64():
    query, key, image, response, valid = make_case(b=2, h=4, g=2, s=7, d=3, padding="left")
    assert torch.autograd.gradcheck(
        lambda q, k: image_attention_mass(q, k, image, response, key_valid_mask=valid,
                                          chunk_size=2),
        (leaf(query), leaf(key)),
    )


def test_rejects_bad_shapes_with_a_clear_message():
    query, key, image, response, valid = make_case(h=4, g=2)
    with pytest.raises(ValueError, match="multiple of key heads"):
        image_attention_mass(query, key[:, :1].expand(-1, 3, -1, -1), image, response)
    with pytest.raises(ValueError, match="image_mask must be a bool"):
        image_attention_mass(query, key, image.float(), response)
    with pytest.raises(ValueError, match="chunk_size"):
        image_attention_mass(query, key, image, response, chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is)")
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-2, 4e-3)]
)
def test_cuda_matches_float64_reference(dtype, rtol, atol, chunk_size):
    """The same function on the GPU (cuBLAS, fp32 math under bf16) against the CPU float64
    reference on the same rounded inputs."""
    query, key, image, response, valid = make_case(b=3, h=8, g=2, s=48, d=32, dtype=dtype,
                                                   seed=7)
    upstream = torch.randn(image.shape, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    q, k = leaf(query.cuda()), leaf(key.cuda())
    mass = image_attention_mass(q, k, image.cuda(), response.cuda(), key_valid_mask=valid.cuda(),
                                chunk_size=chunk_size)
    assert mass.dtype == torch.float32 and mass.is_cuda
    (mass.double() * upstream.cuda()).sum().backward()
    q_ref, k_ref = leaf(query.double()), leaf(key.double())
    mass_ref = naive_image_attention_mass(q_ref, k_ref, image, response, None, valid)
    (mass_ref * upstream).sum().backward()
    assert_matches((mass.cpu(), q.grad.cpu(), k.grad.cpu()), (mass_ref, q_ref.grad, k_ref.grad),
                   rtol=rtol, atol=atol)


_TF32_CHECK = r"""
import types, sys
import torch
from megatron_ease.ease.attention import _matmul_precision

bf16_on_gpu = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
if sys.argv[1] == "legacy":
    # TF32 for bf16 inputs inside, the process's own setting restored after.
    torch.backends.cuda.matmul.allow_tf32 = False
    with _matmul_precision(bf16_on_gpu):
        assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
else:
    # A process that chose TF32 through the newer API: torch refuses the legacy flag then.
    torch.backends.fp32_precision = "tf32"
    with _matmul_precision(bf16_on_gpu):
        pass
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
print("ok")
"""


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_matmul_precision_leaves_the_process_tf32_setting_working(api):
    """The slice's TF32 switch (bf16 on GPU) ran into torch's RuntimeError in a process that had
    set TF32 through ``torch.backends.fp32_precision``: every EASE forward would have failed.
    Run apart: the TF32 settings are process-global."""
    out = subprocess.run([sys.executable, "-c", _TF32_CHECK, api], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
