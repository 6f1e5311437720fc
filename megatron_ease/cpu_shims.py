"""CPU shims for megatron-core, applied only when CUDA is absent.

megatron-core is written for GPUs; on a CPU-only torch build a handful of its code paths touch
CUDA directly. Development and CI run the *same* megatron-core code on CPU with gloo, so each
place is bridged here, once, with the reason. Written against megatron-core 0.16.1; every shim is
a no-op on a machine where ``torch.cuda.is_available()`` is true, and each one is checked by
``tests/unit/test_cpu_shims.py`` so a megatron-core upgrade that changes these spots fails loudly.

Config flags are used instead of patches where megatron-core has them: models are built with
``use_cpu_initialization=True`` and the local (non-TE) layer specs, and attention gets an explicit
mask; see ``megatron_ease.models``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False

# Modules that allocate small tensors with a literal ``device="cuda"``: token counters in the
# pipeline schedules, grad-norm buffers in clip_grads and in the local multi-tensor l2-norm of
# megatron.core.utils, loss-scale tensors in the optimizer and grad scaler, broadcast helpers of
# tensor_parallel.data, causal masks of transformer.utils, and the exchange buffers of
# dist_checkpointing's fully-parallel strategies. (The grad buffer's only "cuda" literal, its
# NCCL warm-up tensor, runs with ddp_config.nccl_ub only, which needs CUDA anyway.)
# They see a ``torch`` whose factory functions map "cuda" to "cpu"; nothing else changes for them.
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

# Functions that validate parameters with ``Tensor.type() == 'torch.cuda.FloatTensor'`` (and the
# Half/BFloat16 variants). Inside these calls only, CPU tensors report CUDA type names.
_TYPE_STRING_CHECKS = (
    # optimizer.py imported the function by name, so its own reference is the one to wrap.
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")


def _cpu_device(device):
    if device is None:
        return None
    dev = torch.device(device) if isinstance(device, (str, int)) and not isinstance(device, bool) \
        else device
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuFactoryTorch(types.ModuleType):
    """A stand-in for the ``torch`` module whose tensor factories map device "cuda" to "cpu"."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__megatron_ease_shim__ = True
    return wrapper


class CpuRNGStatesTracker:
    """megatron-core's ``CudaRNGStatesTracker`` for the CPU generator.

    Megatron forks a per-TP-rank RNG stream for dropout/initialisation inside tensor-parallel
    regions; on CPU the streams are states of torch's default CPU generator. Same names, same seed
    offsets (``model_parallel_seed``), same ``fork`` semantics.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0):
    """CPU twin of ``model_parallel_cuda_manual_seed``: same three streams, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    tracker = CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_method(module_name, class_name, attr):
    module = importlib.import_module(module_name)
    owner = getattr(module, class_name) if class_name else module
    raw = inspect.getattr_static(owner, attr)
    if isinstance(raw, (staticmethod, classmethod)):
        if getattr(raw.__func__, "__megatron_ease_shim__", False):
            return
        setattr(owner, attr, type(raw)(_with_cuda_type_names(raw.__func__)))
    elif not getattr(raw, "__megatron_ease_shim__", False):
        setattr(owner, attr, _with_cuda_type_names(raw))


def apply_cpu_shims() -> bool:
    """Apply every shim once when CUDA is absent; return whether they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # Allocations in tensor_parallel mappings/layers, p2p, the optimizer and rotary embeddings
    # pass ``device=torch.cuda.current_device()``; on CPU that device is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p_communication and DDP call it around communication; CPU work is already synchronous.
    torch.cuda.synchronize = lambda device=None: None
    # optimizer state loading and the gloo path of the distributed optimizer call ``.cuda()``
    # on tensors that are meant to stay on the training device, which here is the CPU.
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kw: self

    from megatron.core.tensor_parallel import random as mrandom

    # Activation recomputation saves/restores "the CUDA RNG state" around the recomputed
    # forward; on CPU the stream in use is the CPU generator.
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        module.torch = _CpuFactoryTorch()

    for module_name, class_name, attr in _TYPE_STRING_CHECKS:
        _patch_method(module_name, class_name, attr)

    _APPLIED = True
    logger.debug("megatron-core CPU shims applied")
    return True
