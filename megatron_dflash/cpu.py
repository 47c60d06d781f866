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
    `pin_memory=True` factories (pinning needs CUDA; RoPE's context-parallel slice makes its
    index so), and `Tensor.type()` reported as torch.cuda.* (DistributedOptimizer checks the
    string);
  * the gated delta net (Qwen3-Next/3.5 linear-attention layers): megatron's GatedDeltaNet calls
    flash-linear-attention's Triton kernels (GPU only; it refuses to build without them): they
    become transformers' pure-torch Qwen3-Next fallbacks, exact in fp32 (`_patch_gated_delta_net`);
  * methods megatron wraps in torch.compile (`jit_fuser`) on the paths these targets take (GDN
    helpers, the attention output gate, gpt-oss's quick_gelu) run eagerly: inductor would
    compile C++ for every new shape, tens of seconds each on a CPU.
"""
import contextlib
import functools

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
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
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


@functools.cache
def _hf_gated_delta_net():
    """transformers' pure-torch Qwen3-Next functions (`__wrapped__`: with fla installed the
    decorator would route them to its GPU kernels). Imported on first use."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    return (hf.causal_conv1d_fn.__wrapped__, hf.torch_chunk_gated_delta_rule.__wrapped__,
            hf.l2norm)


def _refuse(kernel: str, **given) -> None:
    """megatron's training forward passes none of these (its inference path is unimplemented)."""
    names = [name for name, value in given.items() if value is not None and value is not False]
    if names:
        raise NotImplementedError(f"the CPU {kernel} takes no {', '.join(names)}")


def _segments(cu_seqlens, *tensors):
    """[1, t, ...] tensors cut at `cu_seqlens` (packed sequences, megatron's THD format): fla's
    varlen kernels run each segment alone from a zero state, and so do these, one at a time."""
    return zip(*(t.split(cu_seqlens.diff().tolist(), dim=1) for t in tensors))


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, **kwargs):
    """fla's `causal_conv1d` (x [b, s, d], weight [d, w]) -> (y [b, s, d], None)."""
    _refuse("causal conv", initial_state=initial_state, output_final_state=output_final_state)
    conv, _, _ = _hf_gated_delta_net()

    def run(x):
        return conv(x.transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
    if cu_seqlens is not None:
        return torch.cat([run(part) for (part,) in _segments(cu_seqlens, x)], dim=1), None
    return run(x), None


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, use_qk_l2norm_in_kernel=False,
                           cu_seqlens=None, **kwargs):
    """fla's `chunk_gated_delta_rule` ([b, s, heads, d] layout, fp32 inside, scale dk^-1/2)."""
    _refuse("gated delta rule", scale=None if scale in (None, k.shape[-1] ** -0.5) else scale)
    _, rule, _ = _hf_gated_delta_net()
    if cu_seqlens is not None:
        _refuse("gated delta rule over packed sequences", initial_state=initial_state,
                output_final_state=output_final_state)
        return torch.cat([rule(*parts[:3], g=parts[3], beta=parts[4],
                               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                          for parts in _segments(cu_seqlens, q, k, v, g, beta)], dim=1), None
    return rule(q, k, v, g=g, beta=beta, initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def l2norm(x, eps: float = 1e-6, output_dtype=None):
    """fla's `l2norm` over the last dim, computed in fp32 as its kernel does."""
    _, _, norm = _hf_gated_delta_net()
    return norm(x.float(), dim=-1, eps=eps).to(output_dtype or x.dtype)


def _patch_gated_delta_net():
    from megatron.core.ssm.gated_delta_net import common, gdn

    common.HAVE_FLA = True
    common.l2norm = l2norm
    gdn.causal_conv1d = causal_conv1d
    gdn.chunk_gated_delta_rule = chunk_gated_delta_rule


def _run_compiled_methods_eagerly():
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.transformer.attention import Attention

    for cls, names in ((GatedDeltaNet, ("_apply_gated_norm", "_prepare_input_for_gated_delta_rule",
                                   "_compute_g_and_beta")),
                       (Attention, ("_apply_output_gate",))):
        for name in names:
            setattr(cls, name, getattr(cls, name).__wrapped__)
    # gpt-oss's expert activation: megatron checks it by identity, so the compiled object stays
    # and dynamo skips its code and what it calls.
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    from torch._dynamo.eval_frame import set_code_exec_strategy
    from torch._dynamo.types import FrameAction, FrameExecStrategy

    set_code_exec_strategy(quick_gelu.__wrapped__.__code__,
                           FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


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
    _patch_gated_delta_net()
    _run_compiled_methods_eagerly()
    CudaToCpuMode().__enter__()  # active for the life of the process
    _applied = True
