"""Where the kernels can run, and a launch path that skips Triton's argument binding for repeated calls."""
import functools
import numbers
import os

import torch
import triton

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Triton's interpreter runs kernels on the CPU (slowly, with numpy): for tests on machines without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# EFFREPRO_AUTOTUNE=0 gives each autotuned kernel its first config instead of timing them all: for tests, where
# every new shape would otherwise be tuned (on a GPU, compiling and timing each config of each shape took most of a
# test call's minutes).
AUTOTUNE = os.environ.get("EFFREPRO_AUTOTUNE", "1") != "0"


MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # the head sizes the attention kernels take


# Host-side arithmetic for launches: Triton's `cdiv` and `next_power_of_2` are constexpr functions whose calls cost
# microseconds each on the host (Triton 3.9), in calls that a training or decode loop repeats for every kernel.
def cdiv(n: int, d: int) -> int:
    return -(-n // d)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1: below, `bit_length` would give 2 for 0)."""
    if n < 1:
        raise ValueError(f"next_pow2 takes n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


@functools.cache
def sm_count(device) -> int:
    """The streaming multiprocessors of a CUDA `device` (a torch.device or an index), looked up once: grids that
    fill a GPU size themselves by it on every launch."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def capability(device) -> tuple[int, int]:
    """The compute capability of a CUDA `device`, looked up once: the Gluon kernels' check of every call asks it."""
    return torch.cuda.get_device_capability(device)


HOPPER_BLOCK_SMEM = 227 * 1024  # the shared memory a block may opt into on Hopper
HOPPER_SM_SMEM = 228 * 1024  # the shared memory of a Hopper SM, which the blocks resident on it share
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third dimensions (the first takes 2**31 - 1)


@functools.cache
def _shared_memory(prop: str, hopper: int, device) -> int:
    """A shared-memory property of a CUDA `device` (default: the current GPU), looked up once; Hopper's where
    there is no GPU to ask (the kernels' choices made on a CPU, for tests)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return hopper
    return getattr(torch.cuda.get_device_properties(device), prop, hopper)


def block_shared_memory(device=None) -> int:
    """The shared memory a block may opt into."""
    return _shared_memory("shared_memory_per_block_optin", HOPPER_BLOCK_SMEM, device)


def sm_shared_memory(device=None) -> int:
    """The shared memory of one SM."""
    return _shared_memory("shared_memory_per_multiprocessor", HOPPER_SM_SMEM, device)


def check_attention_heads(heads: int, kv_heads: int, head_dim: int, kv_name: str) -> None:
    """That an attention kernel takes q's `heads` heads over the `kv_heads` of `kv_name` (a multiple of them:
    grouped-query attention), of `head_dim` lanes."""
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's {heads} heads are not a multiple of {kv_name}'s {kv_heads} KV heads (grouped-query "
                         f"attention)")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} is not supported; use {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")


def real_number(name: str, value) -> float:
    """`value`, an argument called `name`, as the float the kernels take; a ValueError naming it where it is not a
    real number (a bool is not one; a tensor neither: reading it would cost a device sync)."""
    if type(value) is float or type(value) is int:  # nearly every call: ten times cheaper than the ABC's check
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number, not a {type(value).__name__}")
    return float(value)


def int8_mask(key_padding_mask: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A key padding mask as the kernels read it (int8, contiguous), or, without one, a placeholder they never
    read."""
    return key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else placeholder


def runs_on(device) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU, or, under TRITON_INTERPRET=1, the CPU only (the
    interpreter reads tensors as numpy arrays in host memory: a meta tensor has none to read)."""
    return torch.device(device).type == ("cpu" if INTERPRET else "cuda")


def check_tensors(op: str, meta_ok: bool = False, /, **tensors: torch.Tensor | None) -> None:
    """That `op`'s kernels can take these tensors (those given as None aside): all on one device, where they run
    (`runs_on`), or, with `meta_ok` (an operator with a fake version), meta tensors. Otherwise Triton fails deep
    inside a launch ("0 active drivers"), or reads one device's pointer on another. And none in bfloat16 under the
    interpreter, whose arithmetic, dots and sums take bfloat16's raw 16 bits for the number: no error, garbage."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op} takes its tensors on one device; got "
                         + ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None))
    (device,) = devices
    if meta_ok and device.type == "meta":
        return
    if not runs_on(device):
        raise ValueError(f"{op} runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1, for tests; it is "
                         f"{'on' if INTERPRET else 'off'} here); got tensors on {device}")
    if INTERPRET:  # (a GPU's calls, many a step, skip the look at dtypes)
        in_bf16 = [name for name, t in tensors.items() if t is not None and t.dtype == torch.bfloat16]
        if in_bf16:
            raise ValueError(f"{op}: bfloat16 needs a CUDA GPU; the Triton interpreter cannot compute it (got "
                             f"{', '.join(in_bf16)} in bfloat16); use float16 or float32 on the CPU")


# Launches of a prepared decode schedule skip Triton's argument binding (see `launch`); set
# EFFREPRO_FAST_LAUNCH=0 to send every launch through Triton's JIT entry, should a Triton release change the
# compiled kernel's calling convention (checked on the GPU with Triton 3.6; the same code in 3.9's source).
FAST_LAUNCH = os.environ.get("EFFREPRO_FAST_LAUNCH", "1") != "0" and not INTERPRET


def signature(*tensors) -> tuple:
    """What Triton specialises a launch on, of these tensors (shapes and strides, which give the integer arguments
    made from them, dtypes, devices, and the 16-byte alignment it specialises pointers on): the key under which a
    caller keeps launches (`launch`)."""
    return tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in tensors)


class KeptLaunches:
    """The kept launches (`launch`) of a module's kernels, one dict per call signature: the signatures of the tensors
    that the kernels are given or whose layouts give theirs, and the settings that choose the kernels' other
    integer and constexpr arguments. Calls that repeat a signature (a training loop's, at every layer and step)
    then launch compiled kernels directly."""

    MAX_SIGNATURES = 1024  # a loop over ever new shapes (lengths that vary) keeps the newest, never unbounded

    def __init__(self):
        self.by_call = {}

    def __call__(self, tensors: tuple, *settings) -> dict | None:
        """The dict to give `launch` for such a call; None where launches are not kept."""
        if not FAST_LAUNCH:
            return None
        key = (signature(*tensors), *settings)
        kept = self.by_call.get(key)
        if kept is None:
            if len(self.by_call) >= self.MAX_SIGNATURES:
                del self.by_call[next(iter(self.by_call))]  # the oldest
            kept = self.by_call[key] = {}
        return kept


def launch(kernel, grid, args: tuple, meta: dict, kept: dict | None = None, name: str = ""):
    """`kernel[grid](*args, **meta)`. With `kept`, a dict whose owner ensures that every launch given it has the
    same argument types, alignments, integer values that Triton specialises on (strides, sizes), `meta` and grid
    (a prepared decode schedule; one call signature of flash_attn): the first launch's compiled kernel is kept there
    under `name`, and later launches call it directly. That skips Triton's binding and specialisation of every
    argument, its cache lookup and an autotuner's choice of config, most of the host's time for a kernel of 40
    arguments (effrepro_kernels/NOTES.md). `kernel` may be autotuned (its chosen config's values join `meta`) and
    `grid` a function of the meta-parameters, as Triton takes it. A launch whose `meta` differs from the kept one's
    goes through the JIT (and is kept instead). What Triton specialises on at run time (an integer equal to 1 or
    divisible by 16, an int where a float was, a pointer's alignment) is the owner's to fix: pass scalars as the
    types the first launch had (floats as floats), and key by `signature` what the integers come from."""
    fast = kept.get(name) if kept is not None else None
    if fast is not None and fast[2] == meta:  # a kept kernel compiled for other constexprs is never called
        runner, constexprs, _ = fast
        runner(*args, *constexprs)
        return
    compiled = kernel[grid](*args, **meta)
    if kept is not None and FAST_LAUNCH and hasattr(compiled, "__getitem__"):
        config = getattr(kernel, "best_config", None)  # the autotuner's choice for these arguments
        chosen = {**meta, **config.kwargs} if config is not None else meta
        grid = grid(chosen) if callable(grid) else grid
        # the compiled kernel takes a grid of three dimensions, and every parameter in order (constexprs
        # included, launch options not)
        kept[name] = (compiled[(*grid, 1, 1)[:3]], tuple(chosen[n] for n in kernel.arg_names[len(args):]), meta)
