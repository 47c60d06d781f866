"""megatron-core 0.19.2 on a machine without CUDA (gloo): the few adaptations it needs, in one place.

CPU is where the embedded default trains, so this is part of the product: the main job, the tools
and the tests call `apply()` when CUDA is absent; it is a no-op where CUDA is available. Each
patch answers one concrete failure of megatron-core on CPU:
  * torch.cuda.current_device() -> cpu: buffers, RoPE inv_freq and TP collectives allocate on it;
  * a CPU RNG tracker: attention/dropout always fork the model-parallel CUDA RNG state;
  * stream/event/synchronize no-ops: megatron DDP touches torch.cuda.current_stream(), the MoE
    alltoall token dispatcher records and waits on a device-to-host stream's event;
  * the MoE alltoall token dispatcher's split sizes: on GPU its device-to-host copy hands them
    to all_to_all_single as numpy arrays; on CPU nothing is copied and they stay tensors, which
    c10d refuses: convert them as the copy would;
  * uneven all-gather / reduce-scatter (megatron's `output_split_sizes` / `input_split_sizes`),
    which the MoE alltoall dispatcher runs over the expert-TP group: gloo takes equal pieces
    only, so gather padded pieces, and reduce whole then keep the rank's piece (the same sums);
  * CudaToCpuMode: hard-coded device="cuda" in schedules, optimizer, clip_grads, dist_checkpointing,
    and `Tensor.type()` reported as torch.cuda.* (DistributedOptimizer checks the string).
"""
import contextlib

import torch

_CPU = torch.device("cpu")
_applied = False


class _NullStream:
    """Stand-in for torch.cuda.Stream/Event: every synchronisation is a no-op on CPU."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def query(self):
        return True

    def record_event(self, *a, **k):  # an event to synchronize on later (MoE alltoall dispatcher)
        return _NullStream()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _is_cuda(device):
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Redirect every request for a CUDA tensor to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device=_CPU)
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory") and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            t = func(*args)
            return t.replace("torch.", "torch.cuda.", 1) if not t.startswith("torch.cuda.") else t
        return func(*args, **kwargs)


def _install_cpu_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """CudaRNGStatesTracker bookkeeping on torch's CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_ or name in self.states_:
                raise Exception(f"rng state {name}/{seed} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker(force_reset=True)


def _patch_moe_split_sizes():
    from megatron.core.transformer.moe import token_dispatcher

    move = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[:group.rank()])
        return total[start:start + sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def apply():
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = torch.cuda.Event = _NullStream
    torch.cuda.stream = lambda *a, **k: _NullStream()
    torch.cuda.empty_cache = lambda: None
    _install_cpu_rng_tracker()
    _patch_moe_split_sizes()
    _patch_uneven_collectives()
    CudaToCpuMode().__enter__()  # active for the life of the process
    _applied = True
