"""Fast paths for the four-flow diffuser that compute what the plain forward computes.

* **channels-last** — convolution weights and image activations in NHWC order: cuDNN's fast
  fp16/bf16 convolutions want it, and the context layers' ``(B, C, H, W) ↔ (B, H·W, C)`` token
  views become free (algorithm.md §3.3 is unchanged: the same sums in another memory order).
* **torch.compile** — Inductor fuses GroupNorm+SiLU, GEGLU and the residual adds into a few
  kernels. Off by default (on the CPU it does not pay: the forward is convolution/GEMM-bound);
  the first call compiles for minutes at full size, so a persistent cache directory makes later
  processes start fast.
* **CUDA graphs** — one forward of fixed shapes is recorded once and replayed with a single
  launch. The text diffuser (algorithm.md §3.4) is launch-bound on a GPU: hundreds of small kernels,
  each shorter than its launch. Only for CUDA tensors under ``torch.no_grad``/``inference_mode``;
  anything else runs eagerly.

``accelerate_diffuser(diffuser, ...)`` returns a module with the diffuser's ``forward(x, t,
contexts)`` contract, ``config`` and ``parts``, so flows, samplers and ``GuidedEps`` take it in
place of the diffuser. :class:`CUDAGraphRunner` is the generic recorder; :func:`graphed_eps`
applies it to a whole guided ε-model (the ``[uncond; cond]`` batching and the guidance
arithmetic included) for one sampling run.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .diffuser import ContextInput
from .errors import VDError, VDInputError

log = logging.getLogger(__name__)

# Modes whose own CUDA graphs (cudagraph trees) cannot run inside a graph we record.
_SELF_GRAPHING_MODES = ("reduce-overhead", "max-autotune")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", *_SELF_GRAPHING_MODES)
# Where the command line keeps compiled kernels between processes (the ComfyUI node passes a folder
# under ComfyUI's user directory instead).
DEFAULT_COMPILE_CACHE = Path("~/.cache/vd_core/inductor")


@contextmanager
def compile_cache_scope(cache_dir: str | os.PathLike) -> Iterator[Path]:
    """Inductor's (and Triton's, beneath) cache directory is ``cache_dir`` inside the block only.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks for a cached or compiled kernel;
    the variable (set or unset) and Inductor's memoised paths are restored on the way out, so
    other compilations of the process keep their own cache.

    Yields:
        The absolute cache directory, created if missing.
    """
    from torch._inductor.utils import clear_caches

    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    clear_caches()
    try:
        yield path
    finally:
        clear_caches()
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def inductor_backend(mode: str = "default", cache_dir: str | os.PathLike | None = None) -> Callable:
    """A ``torch.compile`` backend: Inductor with ``mode``'s options, compiling (and looking up its
    caches) in ``cache_dir`` when given. The options and the directory hold for the compilations
    this backend runs — Dynamo calls it exactly when it compiles — and nowhere else."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode)

    def backend(graph_module, example_inputs):
        if cache_dir is None:
            return compile_fx(graph_module, example_inputs, config_patches=patches)
        with compile_cache_scope(cache_dir):
            return compile_fx(graph_module, example_inputs, config_patches=patches)

    return backend


def graph_key(static: Hashable, tensors: Sequence[torch.Tensor]) -> tuple:
    """What a recorded graph is valid for: the caller's ``static`` configuration and each input's
    shape, dtype and device. Strides are not part of it: inputs are copied into the graph's own
    buffers, whatever their layout."""
    return (static, *((tuple(a.shape), a.dtype, a.device) for a in tensors))


class _RecordedGraph:
    """One recorded call: input buffers the graph reads, the output buffer it writes, and ``replay``."""

    def __init__(self, inputs: list[torch.Tensor], output: torch.Tensor, replay: Callable[[], None]):
        self.inputs = inputs
        self.output = output
        self.replay = replay


class CUDAGraphRunner:
    """Replays CUDA graphs of ``fn(static, *tensors) -> Tensor`` for the shapes it has seen.

    The first call for a :func:`graph_key` runs ``fn`` ``warmup`` times on a side stream (cuBLAS
    and cuDNN choose their algorithms, ``torch.compile`` compiles) and records the next call into
    a graph that reads fixed input buffers. Every later call with that key copies its tensors into
    those buffers, replays the graph (one launch, no host synchronisation) and returns a
    contiguous copy of the output. Calls with tensors not all on CUDA, or with gradients enabled, run ``fn`` eagerly.

    ``fn`` must depend only on its arguments and on tensors that stay where they are while the
    graphs live (weights, cached contexts): call :meth:`release` after moving those. ``static``
    is a hashable value that selects ``fn``'s non-tensor behaviour (context kinds and ratios).

    Args:
        fn: ``fn(static, *tensors) -> Tensor``; no host synchronisation, no randomness.
        max_graphs: graphs kept (least recently used dropped first); each holds the memory of one
            forward's activations.
        warmup: eager runs before recording.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, max_graphs: int = 4, warmup: int = 3):
        if max_graphs < 1 or warmup < 1:
            raise VDInputError(f"max_graphs ({max_graphs}) and warmup ({warmup}) must be at least 1")
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[tuple, _RecordedGraph] = OrderedDict()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def release(self) -> None:
        """Drop every recorded graph and its memory (the next call records again)."""
        self._graphs.clear()

    def __call__(self, static: Hashable, *tensors: torch.Tensor) -> torch.Tensor:
        if not self._can_record(tensors):
            return self.fn(static, *tensors)
        key = graph_key(static, tensors)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._record(static, tensors)
            self._graphs[key] = graph
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            for buffer, value in zip(graph.inputs, tensors):
                buffer.copy_(value)
        graph.replay()
        return graph.output.clone(memory_format=torch.contiguous_format)

    def _can_record(self, tensors: Sequence[torch.Tensor]) -> bool:
        return (
            not torch.is_grad_enabled()
            and torch.cuda.is_available()
            and all(a.device.type == "cuda" for a in tensors)
            and not torch.cuda.is_current_stream_capturing()  # inside another graph: that one records us
        )

    def _record(self, static: Hashable, tensors: Sequence[torch.Tensor]) -> _RecordedGraph:
        # Buffers outside inference mode, so that replays under plain no_grad may write them too.
        with torch.inference_mode(False):
            inputs = [a.clone() for a in tensors]
        output, replay = self._capture(static, inputs)
        log.debug("recorded a CUDA graph for %s", graph_key(static, tensors))
        return _RecordedGraph(inputs, output, replay)

    def _capture(self, static: Hashable, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        """Warm up on a side stream, then record ``fn(static, *inputs)``; returns the output buffer
        and the replay function."""
        device = inputs[0].device
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static, *inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    output = self.fn(static, *inputs)
            except RuntimeError as exc:
                raise VDError(
                    f"recording a CUDA graph failed ({exc}); run without CUDA graphs "
                    "(accelerate_diffuser(..., cuda_graphs=False), graphed_eps(..., enabled=False))"
                ) from exc
        return output, graph.replay


class GraphedEps:
    """A guided ε-model ``eps(x, t)`` (e.g. :class:`~vd_core.samplers.GuidedEps`) replayed from a
    CUDA graph: contexts, guidance batching and the ``ε_u + s·(ε_c − ε_u)`` arithmetic are all in
    the graph. Build one per sampling run (its contexts are fixed); drop it or call
    :meth:`release` afterwards to free the graph's memory."""

    def __init__(self, eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **runner_options):
        self.runner = CUDAGraphRunner(lambda _static, x, t: eps_model(x, t), **runner_options)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x (B, ...)``, ``t (B,)`` → ε shaped like ``x``."""
        return self.runner(None, x, t)

    def release(self) -> None:
        self.runner.release()


def graphed_eps(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], enabled: bool = True, **runner_options
):
    """``eps_model`` wrapped in :class:`GraphedEps` when ``enabled``, else unchanged."""
    return GraphedEps(eps_model, **runner_options) if enabled else eps_model


class AcceleratedDiffuser(nn.Module):
    """A ``FourFlowDiffuser`` behind the fast paths chosen in :func:`accelerate_diffuser`.

    ``forward(x, t, contexts)`` has the diffuser's contract and returns the same ε (same shape,
    dtype, contiguous NCHW / (B, L) layout). ``config`` and ``parts`` are the diffuser's; its
    weights are this module's ``diffuser.*`` parameters.
    """

    def __init__(
        self,
        diffuser: nn.Module,
        *,
        channels_last: bool,
        compiled: Callable | None,
        cuda_graphs: bool,
        max_graphs: int,
    ):
        super().__init__()
        self.diffuser = diffuser
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        self._compiled = compiled  # a compiled function, not a module: it adds no state_dict keys
        self._runner = CUDAGraphRunner(self._run, max_graphs=max_graphs)
        self._layers = list(diffuser.modules())
        self._weights_at: tuple[int, ...] | None = None

    @property
    def config(self):
        return self.diffuser.config

    @property
    def parts(self):
        return self.diffuser.parts

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: Sequence[ContextInput]) -> torch.Tensor:
        """``FourFlowDiffuser.forward``: x (B, C, h, w) or (B, L), t (B,) → ε like x."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:  # the runner itself runs CPU tensors eagerly
            eps = self._graphed(x, t, contexts)
        else:
            eps = self._forward(x, t, contexts)
        return eps.contiguous()

    def _forward(self, x: torch.Tensor, t: torch.Tensor, contexts: Sequence[ContextInput]) -> torch.Tensor:
        return (self._compiled or self.diffuser)(x, t, contexts)

    def release_graphs(self) -> None:
        """Free every recorded CUDA graph (their memory goes back to PyTorch's allocator)."""
        self._runner.release()

    def _graphed(self, x: torch.Tensor, t: torch.Tensor, contexts: Sequence[ContextInput]) -> torch.Tensor:
        # A graph reads the weights at the addresses they had when it was recorded; a host that
        # moved or replaced them (ComfyUI offloading or weight patching, .to()) invalidates every
        # graph. Reading each layer's parameter dict costs ~0.2 ms, while the GPU runs the last step.
        weights_at = tuple(
            p.data_ptr() for layer in self._layers for p in layer._parameters.values() if p is not None
        )
        if weights_at != self._weights_at:
            self._runner.release()
            self._weights_at = weights_at
        static = tuple((c.kind, float(c.ratio)) for c in contexts)
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t).to(x.device)
        return self._runner(static, x, t, *(c.tokens for c in contexts))

    def _run(self, static: tuple, x: torch.Tensor, t: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
        contexts = [ContextInput(kind, tokens_i, ratio) for (kind, ratio), tokens_i in zip(static, tokens)]
        return self._forward(x, t, contexts)

    def _apply(self, fn, recurse=True):
        self.release_graphs()  # .to()/.half()/.cuda() move the weights the graphs point at
        return super()._apply(fn, recurse)


def accelerate_diffuser(
    diffuser: nn.Module,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    compile_backend: str = "inductor",
    cache_dir: str | os.PathLike | None = None,
    cuda_graphs: bool = False,
    max_graphs: int = 4,
) -> AcceleratedDiffuser:
    """Wrap ``diffuser`` (a ``FourFlowDiffuser``) in the chosen fast paths; all are off by default.

    Args:
        diffuser: the model; converted to channels-last **in place** when asked (the returned
            module shares its weights).
        channels_last: NHWC convolution weights and image activations (GPU fp16/bf16: faster
            cuDNN kernels; CPU float32: a few percent).
        compile: ``torch.compile`` the forward (the first call of each shape compiles; minutes at
            full size on a GPU).
        compile_mode: ``"default"`` or ``"max-autotune-no-cudagraphs"`` (longer compile, faster
            GEMMs); ``"reduce-overhead"``/``"max-autotune"`` record their own CUDA graphs and are
            refused together with ``cuda_graphs``.
        compile_backend: ``"inductor"`` (generated kernels) or a debugging backend such as
            ``"aot_eager"`` (traces the same graph, runs it with eager kernels).
        cache_dir: keep compiled kernels here across processes (Inductor only; the directory holds
            for this model's compilations, :func:`compile_cache_scope`; process settings are untouched).
        cuda_graphs: record each (shapes, context kinds, ratios) forward on CUDA once and replay it.
        max_graphs: recorded graphs kept at once.

    Returns:
        An :class:`AcceleratedDiffuser` usable wherever the diffuser is.

    Raises:
        VDInputError: an unknown compile mode, or a self-graphing mode with ``cuda_graphs``.
    """
    if compile_mode not in COMPILE_MODES:
        raise VDInputError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, not {compile_mode!r}")
    if compile and cuda_graphs and compile_mode in _SELF_GRAPHING_MODES:
        raise VDInputError(
            f"compile_mode {compile_mode!r} records its own CUDA graphs, which cannot run inside the "
            "graphs of cuda_graphs=True; use compile_mode='max-autotune-no-cudagraphs' or 'default'"
        )
    if channels_last:
        diffuser.to(memory_format=torch.channels_last)
    compiled = None
    if compile:
        # Modes and the cache directory are Inductor's; a debugging backend gets neither.
        backend = inductor_backend(compile_mode, cache_dir) if compile_backend == "inductor" else compile_backend
        # dynamic=None: shapes and ratios are specialised first, and made symbolic when they change
        # (one recompilation) instead of compiling again for every new value.
        compiled = torch.compile(diffuser.forward, backend=backend, dynamic=None)
    log.info(
        "diffuser fast paths: channels_last=%s compile=%s (%s, %s) cuda_graphs=%s",
        channels_last, compile, compile_mode, compile_backend, cuda_graphs,
    )
    return AcceleratedDiffuser(
        diffuser, channels_last=channels_last, compiled=compiled, cuda_graphs=cuda_graphs, max_graphs=max_graphs
    )
