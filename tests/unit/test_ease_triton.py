"""The fused Triton slice (``triton_attention``) against the naive float64 reference (DESIGN §4).

Without a GPU the kernels run under Triton's interpreter on CPU tensors. ``TRITON_INTERPRET=1``
must be set before ``triton.jit`` decorates them, so every interpreted case runs in one
subprocess (``_WORKER``) started with it; this process builds the inputs, computes the reference
and compares. ``test_compiled_kernels_on_cuda_*`` run the real compiled kernels where a GPU is.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_ease.ease import attention
from megatron_ease.ease.attention import image_attention_mass, response_row_index
from tests.unit.test_ease_attention import (
    assert_matches,
    leaf,
    make_case,
    naive_image_attention_mass,
)

REPO = Path(__file__).resolve().parents[2]

FLOAT32_TOL = dict(rtol=1e-5, atol=1e-6)
# bf16: the returned gradients are rounded to bf16, and the kernels round the gradient tiles
# a·(u − c) to bf16 before their matmul (as flash-attention backward does with dS).
BFLOAT16_TOL = dict(rtol=1e-2, atol=4e-3)
FLOAT16_TOL = dict(rtol=2e-3, atol=5e-4)

_WORKER = r"""
import sys

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from megatron_ease.ease.attention import image_attention_mass, response_row_index
from megatron_ease.ease.triton_attention import triton_image_attention_mass

# The interpreter keeps bf16 as uint16 bit patterns: its tl.dot multiplies the patterns and its
# fp32 -> bf16 casts truncate (triton-lang/triton#11584; "no bfloat16 operations" in Triton's
# debugging guide). Make it do what the GPU does: bf16 dot operands widen exactly to fp32
# (exact products, fp32 accumulation), and fp32 -> bf16 rounds to nearest even.
def _widen_bf16(handle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    data = torch.from_numpy(handle.data.view(np.int16)).view(torch.bfloat16).float().numpy()
    return interpreter.TensorHandle(data, tl.float32)

_create_dot = interpreter.InterpreterBuilder.create_dot
_cast_impl = interpreter.InterpreterBuilder.cast_impl

def create_dot(self, a, b, d, *args):
    return _create_dot(self, _widen_bf16(a), _widen_bf16(b), d, *args)

def cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                        tl.bfloat16)
    return _cast_impl(self, src, dst_type)

interpreter.InterpreterBuilder.create_dot = create_dot
interpreter.InterpreterBuilder.cast_impl = cast_impl

results = {}
for name, case in torch.load(sys.argv[1], weights_only=True).items():
    runs = []
    for _ in range(case["repeats"]):
        query = case["query"].detach().requires_grad_()
        key = case["key"].detach().requires_grad_()
        if case["blocks"] is None:  # through the public function, default blocks
            mass = image_attention_mass(
                query, key, case["image"], case["response"], softmax_scale=case["scale"],
                key_valid_mask=case["valid"], chunk_size=3, impl="triton")
        else:
            block_m, block_n = case["blocks"]
            mass = triton_image_attention_mass(
                query, key, case["image"], case["valid"], case["scale"],
                response_row_index(case["response"]), block_m=block_m, block_n=block_n)
        (mass.double() * case["upstream"]).sum().backward()
        runs.append((mass.detach(), query.grad, key.grad))
    results[name] = runs
torch.save(results, sys.argv[2])
"""


def _upstream(image):
    return torch.randn(image.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def _case(query, key, image, response, valid, *, blocks, scale=None, repeats=1):
    return dict(query=query, key=key, image=image, response=response, valid=valid,
                scale=scale if scale is not None else query.shape[-1] ** -0.5, blocks=blocks,
                repeats=repeats, upstream=_upstream(image))


def _edge_samples():
    """b = 4: a normal sample, one without image tokens, one without response rows, and one
    whose left padding is marked as response rows (rows with no allowed key)."""
    query, key, image, response, valid = make_case(b=4, h=4, g=2, s=48, d=16, padding="left",
                                                   dtype=torch.float32, seed=3)
    image, response = image.clone(), response.clone()
    image[1] = False
    response[2] = False
    response[3, :5] = True  # sample 3 is left-padded by 9
    return query, key, image, response, valid


def _megatron_layout(query, key, *masks):
    """q/k as the EASE layer passes them: [s, b, h, d] storage permuted to [b, h, s, d]."""
    def permuted(x):
        return x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)

    return (permuted(query), permuted(key), *masks)


def _interpreter_cases():
    f32 = dict(d=16, dtype=torch.float32)
    return {
        "mha_right_padding": (
            _case(*make_case(b=2, h=4, g=4, s=45, padding="right", **f32), blocks=(16, 16)),
            FLOAT32_TOL),
        "gqa2_left_padding": (
            _case(*make_case(b=3, h=4, g=2, s=53, padding="left", **f32), blocks=(16, 32),
                  repeats=2),
            FLOAT32_TOL),
        "gqa4_right_padding": (
            _case(*make_case(b=2, h=8, g=2, s=61, padding="right", **f32), blocks=(32, 16)),
            FLOAT32_TOL),
        "custom_scale": (
            _case(*make_case(b=2, h=4, g=1, s=40, **f32), blocks=(16, 16), scale=0.37),
            FLOAT32_TOL),
        "edge_samples": (_case(*_edge_samples(), blocks=(16, 16)), FLOAT32_TOL),
        "head_dim_24": (
            _case(*make_case(b=2, h=4, g=2, s=50, d=24, dtype=torch.float32), blocks=(16, 16)),
            FLOAT32_TOL),
        "megatron_layout": (
            _case(*_megatron_layout(*make_case(b=2, h=4, g=2, s=44, **f32)), blocks=(16, 16)),
            FLOAT32_TOL),
        "public_function_default_blocks": (
            _case(*make_case(b=2, h=4, g=2, s=90, padding="left", **f32), blocks=None),
            FLOAT32_TOL),
        "bfloat16": (
            _case(*make_case(b=2, h=4, g=2, s=50, d=16, dtype=torch.bfloat16), blocks=(16, 16)),
            BFLOAT16_TOL),
        "float16": (
            _case(*make_case(b=2, h=4, g=2, s=50, d=16, dtype=torch.float16), blocks=(16, 32)),
            FLOAT16_TOL),
    }


CASES = _interpreter_cases()


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """name -> [(mass, grad_query, grad_key)] per run, from the kernels under the interpreter."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("ease_triton")
    torch.save({name: case for name, (case, _) in CASES.items()}, tmp / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp / "cases.pt"), str(tmp / "results.pt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"interpreter worker failed:\n{result.stderr[-4000:]}"
    return torch.load(tmp / "results.pt", weights_only=True)


def _reference(case):
    query, key = leaf(case["query"].double()), leaf(case["key"].double())
    mass = naive_image_attention_mass(query, key, case["image"], case["response"], case["scale"],
                                      case["valid"])
    (mass * case["upstream"]).sum().backward()
    return mass, query.grad, key.grad


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_float64_reference(interpreted, name):
    case, tolerance = CASES[name]
    mass, grad_query, grad_key = interpreted[name][0]
    assert mass.dtype == torch.float32
    assert grad_query.dtype == case["query"].dtype and grad_key.dtype == case["key"].dtype
    assert_matches((mass, grad_query, grad_key), _reference(case), **tolerance)
    assert (mass[~case["image"]] == 0).all(), "non-image columns must be exactly 0"


def test_interpreted_kernels_give_exact_zeros_where_nothing_is_attended(interpreted):
    case, _ = CASES["edge_samples"]
    mass, grad_query, grad_key = interpreted["edge_samples"][0]
    assert all(torch.isfinite(x).all() for x in (mass, grad_query, grad_key))
    assert (mass[1] == 0).all(), "a sample without image tokens has no mass"
    assert (mass[2] == 0).all() and (grad_query[2] == 0).all() and (grad_key[2] == 0).all(), (
        "a sample without response rows contributes nothing")
    padding = ~case["valid"][3]
    assert (grad_query[3][:, padding] == 0).all() and (grad_key[3][:, padding] == 0).all()


def test_interpreted_kernels_are_deterministic(interpreted):
    first, second = interpreted["gqa2_left_padding"]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


def test_auto_uses_the_torch_path_on_cpu(monkeypatch):
    def no_triton():
        raise AssertionError("impl='auto' looked for Triton although the tensors are on the CPU")

    monkeypatch.setattr(attention, "_triton_attention", no_triton)
    query, key, image, response, valid = make_case(dtype=torch.float32)
    outputs = []
    for impl in ("auto", "torch"):
        q, k = leaf(query), leaf(key)
        mass = image_attention_mass(q, k, image, response, key_valid_mask=valid, impl=impl)
        (mass * _upstream(image)).sum().backward()
        outputs.append((mass, q.grad, k.grad))
    for x, y in zip(*outputs, strict=True):
        assert torch.equal(x, y)


@pytest.fixture
def triton_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    attention._triton_attention.cache_clear()
    yield
    attention._triton_attention.cache_clear()


def test_forcing_triton_without_triton_says_what_to_do(triton_missing):
    query, key, image, response, valid = make_case(dtype=torch.float32)
    with pytest.raises(ImportError, match="needs the triton package.*impl='torch'"):
        image_attention_mass(query, key, image, response, impl="triton")
    # auto falls back quietly, whatever the device
    assert attention._use_triton("auto", query, key) is False


def test_forcing_triton_on_cpu_tensors_outside_the_interpreter_says_what_to_do():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    query, key, image, response, valid = make_case(dtype=torch.float32)
    with pytest.raises(ValueError, match="runs on CUDA tensors.*TRITON_INTERPRET=1.*impl='torch'"):
        image_attention_mass(query, key, image, response, key_valid_mask=valid, impl="triton")


def test_auto_picks_triton_on_nvidia_ampere_and_later_only_and_forcing_it_on_rocm_says_why(monkeypatch):
    """ROCm tensors are ``is_cuda`` too, and the kernels' tf32 dots do not compile there (nor
    before Ampere): auto picked Triton on AMD GPUs. Stand-ins for GPU tensors (this machine has
    none)."""
    pytest.importorskip("triton")
    gpu_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    monkeypatch.setattr(torch.version, "hip", None)
    capability = {"cuda:0": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device])
    assert attention._use_triton("auto", gpu_bf16, gpu_bf16) is True
    capability["cuda:0"] = (7, 0)  # before Ampere: no tf32 dots
    assert attention._use_triton("auto", gpu_bf16, gpu_bf16) is False
    capability["cuda:0"] = (9, 0)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert attention._use_triton("auto", gpu_bf16, gpu_bf16) is False
    with pytest.raises(NotImplementedError, match="NVIDIA GPUs.*not ROCm.*impl='torch'"):
        attention._use_triton("triton", gpu_bf16, gpu_bf16)


def test_rejects_unknown_impl_and_unsupported_dtypes():
    query, key, image, response, valid = make_case()
    with pytest.raises(ValueError, match="impl must be 'auto', 'torch' or 'triton'"):
        image_attention_mass(query, key, image, response, impl="cuda")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="use impl='torch'"):  # float64
        image_attention_mass(query, key, image, response, impl="triton")


_TOLERANCE = {torch.float32: FLOAT32_TOL, torch.bfloat16: BFLOAT16_TOL, torch.float16: FLOAT16_TOL}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is)")
@pytest.mark.parametrize(
    "dtype,blocks",
    [(dtype, blocks) for dtype in _TOLERANCE for blocks in (None, (16, 32))]
    # 128-row tiles for the half-precision dtypes only: fp32 tiles that size (IEEE dots, twice the
    # bytes) may not fit the shared memory of the pipelined loads.
    + [(torch.bfloat16, (128, 64)), (torch.float16, (128, 64))],
)
def test_compiled_kernels_on_cuda_match_float64_reference(dtype, blocks):
    """The real compiled kernels (no interpreter) against the CPU float64 reference on the same
    rounded inputs, at a real head dim, GQA 4, both paddings; two runs bit-identical."""
    pytest.importorskip("triton")
    from megatron_ease.ease.triton_attention import triton_image_attention_mass

    for padding in ("left", "right"):
        query, key, image, response, valid = make_case(b=3, h=8, g=2, s=300, d=128,
                                                       padding=padding, dtype=dtype, seed=7)
        case = _case(query, key, image, response, valid, blocks=blocks)
        runs = []
        for _ in range(2):
            q, k = leaf(query.cuda()), leaf(key.cuda())
            rows = response_row_index(response.cuda())
            launch = {} if blocks is None else dict(block_m=blocks[0], block_n=blocks[1])
            mass = triton_image_attention_mass(q, k, image.cuda(), valid.cuda(), case["scale"],
                                               rows, **launch)
            (mass.double() * case["upstream"].cuda()).sum().backward()
            runs.append((mass.detach().cpu(), q.grad.cpu(), k.grad.cpu()))
        assert runs[0][0].dtype == torch.float32 and runs[0][1].dtype == dtype
        assert_matches(runs[0], _reference(case), **_TOLERANCE[dtype])
        for x, y in zip(*runs, strict=True):
            assert torch.equal(x, y), "two runs of the kernels must be bit-identical"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is)")
def test_compiled_kernels_on_cuda_are_what_auto_picks(monkeypatch):
    pytest.importorskip("triton")
    from megatron_ease.ease import triton_attention

    calls = []
    launcher = triton_attention.triton_image_attention_mass
    monkeypatch.setattr(triton_attention, "triton_image_attention_mass",
                        lambda *args, **kwargs: calls.append(1) or launcher(*args, **kwargs))
    query, key, image, response, valid = make_case(dtype=torch.bfloat16)
    mass = image_attention_mass(query.cuda(), key.cuda(), image.cuda(), response.cuda(),
                                key_valid_mask=valid.cuda(), impl="auto")
    assert calls and mass.is_cuda and mass.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is)")
def test_compiled_kernels_on_cuda_never_wait_for_the_device():
    """Given the shared row index (built once per micro-batch), an EASE layer's slice forward and
    backward queue their work without a host synchronisation (CUDA's sync debug mode raises on
    one), so the CPU keeps ahead of the GPU through the layer stack."""
    pytest.importorskip("triton")
    from megatron_ease.ease.triton_attention import triton_image_attention_mass

    query, key, image, response, valid = make_case(b=2, h=4, g=2, s=200, d=64,
                                                   dtype=torch.bfloat16)
    q, k = leaf(query.cuda()), leaf(key.cuda())
    rows = response_row_index(response.cuda())
    image, valid = image.cuda(), valid.cuda()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mass = triton_image_attention_mass(q, k, image, valid, 0.125, rows)
        mass.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert q.grad is not None and k.grad is not None


def test_slice_index_hands_the_kernels_contiguous_arrays():
    """The kernels read ``key_valid`` as a contiguous [b, s] array (``b * seq_len + n``); a
    transposed-view padding mask kept its strides through ``.to(torch.int8)`` and the kernels
    read other samples' entries (max error 0.89 in the interpreter)."""
    pytest.importorskip("triton")
    from megatron_ease.ease.triton_attention import _SliceIndex

    b, s = 3, 40
    valid = torch.ones(s, b, dtype=torch.bool)
    valid[30:, 1] = False
    valid = valid.t()  # [b, s], strides (1, b)
    image = torch.zeros(b, s, dtype=torch.bool)
    image[:, 2:10] = True
    rows = torch.arange(20, 30).expand(b, -1)
    index = _SliceIndex.build(image, valid, rows, torch.ones(b, 10, dtype=torch.bool), 16, 16)
    for name in _SliceIndex._fields[:_SliceIndex.NUM_TENSORS]:
        if name not in ("image_slot", "image_columns"):  # used by torch ops only
            assert getattr(index, name).is_contiguous(), name
    torch.testing.assert_close(index.key_valid, valid.to(torch.int8), rtol=0, atol=0)
