"""The diffuser's fast paths give the plain path's outputs (vd_core.acceleration).

Reference values are the official tiny outputs (apply_model, DDIM trajectories); the plain
``FourFlowDiffuser`` is only used to show that a fast path changes nothing beyond float rounding.
CUDA graphs are recorded for real only on a GPU; on the CPU their bookkeeping (buffers, keys,
eviction, invalidation) runs with a recorder whose "graph" recomputes into the recorded buffers.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import APPLY_MODEL_CASES as CASES
from conftest import assert_close_ref, contexts_for, half_precision_rel, load_tensors

from vd_core.acceleration import (
    AcceleratedDiffuser,
    CUDAGraphRunner,
    GraphedEps,
    accelerate_diffuser,
    compile_cache_scope,
    graph_key,
    graphed_eps,
    inductor_backend,
)
from vd_core.diffuser import ContextInput, DiffuserConfig, DiffuserParts, FourFlowDiffuser
from vd_core.errors import VDInputError
from vd_core.samplers import GuidedEps, sample_ddim

# Fast path vs plain path: the same sums in another order or layout (README: 1 vs 2 threads moves
# a forward by ≤ 3e-6 on outputs of magnitude ≤ 3).
SAME = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are recorded only on a CUDA GPU")


@pytest.fixture(scope="module")
def plain(tiny_model):
    """The plain diffuser the fast paths are compared with (tests deep-copy it before changing it)."""
    return tiny_model


@pytest.fixture(scope="module")
def apply_model(tiny_dir):
    return load_tensors(tiny_dir / "apply_model.safetensors")


class CPURecorder(CUDAGraphRunner):
    """A runner that records on the CPU: its "graph" recomputes ``fn`` from the recorded input
    buffers into the recorded output buffer, which is what replaying a CUDA graph does."""

    calls = 0

    def _can_record(self, tensors):
        return not torch.is_grad_enabled()

    def _capture(self, static, inputs):
        def run():
            type(self).calls += 1
            return self.fn(static, *inputs)

        for _ in range(self.warmup):
            run()
        with torch.inference_mode(False):  # a graph writes its output buffer whatever the mode
            output = run().clone()
        return output, lambda: output.copy_(run())


# ------------------------------------------------------------------------------ channels-last


@pytest.mark.parametrize("name", sorted(CASES))
def test_channels_last_equals_plain_and_official(name, plain, apply_model, tiny_inputs):
    fast = accelerate_diffuser(copy.deepcopy(plain), channels_last=True)
    data, spec = CASES[name]
    x, t, contexts = tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs)
    with torch.no_grad():
        eps = fast(x, t, contexts)
        reference = plain(x, t, contexts)
    assert eps.dtype == x.dtype and eps.is_contiguous()
    assert_close_ref(eps, reference, SAME, f"{name}: channels-last vs plain")
    assert_close_ref(eps, apply_model[name], 1e-4, f"{name}: channels-last vs official")


def test_channels_last_converts_the_convolutions_in_place(plain):
    model = copy.deepcopy(plain)
    fast = accelerate_diffuser(model, channels_last=True)
    conv = model.image.data_blocks[1].get_submodule("0.in_layers.2").weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.diffuser is model
    assert list(fast.state_dict()) == [f"diffuser.{k}" for k in plain.state_dict()]
    assert fast.config == plain.config and fast.parts == plain.parts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["eps_image_textctx", "eps_text_imagectx", "eps_image_mc_text0p3_image0p7"])
def test_half_precision_fast_path_within_spec_tolerance(name, dtype, device, plain, apply_model, tiny_inputs):
    """algorithm.md §9: float16 moves a forward by ≈0.1–0.3 % of float32 (the tolerances of
    tests/test_diffuser.py); channels-last (and on a GPU the recorded graph) adds nothing to that."""
    fast = accelerate_diffuser(copy.deepcopy(plain).to(device, dtype), channels_last=True, cuda_graphs=True)
    half = copy.deepcopy(plain).to(device, dtype)
    data, spec = CASES[name]
    rel = half_precision_rel(dtype, data)
    x, t = tiny_inputs[data].to(device, dtype), tiny_inputs["t_pair"].to(device)
    contexts = [c._replace(tokens=c.tokens.to(device)) for c in contexts_for(spec, tiny_inputs)]
    with torch.no_grad():
        eps = fast(x, t, contexts)
        eps_plain = half(x, t, contexts)
    assert eps.dtype == dtype and torch.isfinite(eps).all()
    assert_close_ref(eps, apply_model[name], rel, f"{name} {dtype} fast vs official float32")
    assert_close_ref(eps, eps_plain, rel / 4, f"{name} {dtype} fast vs plain {dtype}")


# ------------------------------------------------------------------------------ torch.compile


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per function; start and end each compile test without it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["eps_image_textctx", "eps_text_imagectx"])
def test_compiled_forward_equals_plain(name, plain, apply_model, tiny_inputs, fresh_dynamo):
    """The graph TorchDynamo/AOTAutograd trace (the front end Inductor compiles) computes the same
    ε; ``aot_eager`` runs that graph with eager kernels, so the check takes seconds, not minutes."""
    fast = accelerate_diffuser(copy.deepcopy(plain), compile=True, compile_backend="aot_eager")
    data, spec = CASES[name]
    x, t, contexts = tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs)
    with torch.no_grad():
        eps = fast(x, t, contexts)
    assert_close_ref(eps, plain(x, t, contexts), SAME, f"{name}: compiled vs plain")
    assert_close_ref(eps, apply_model[name], 1e-4, f"{name}: compiled vs official")


def test_new_ratios_do_not_recompile_each_time(tiny_inputs, fresh_dynamo):
    """Mixing ratios are Python floats: after one recompilation they are inputs of the compiled
    graph, so moving a strength slider does not compile again. Recompiling is TorchDynamo's
    decision (its guards), whatever the backend; the ``eager`` backend and a one-level diffuser
    keep the test fast."""
    from torch._dynamo.utils import counters

    channels, width = tiny_inputs["x_image"].shape[1], tiny_inputs["ctx_text_rand"].shape[-1]  # the fixture's
    config = DiffuserConfig(32, (1,), (1,), (True,), width, in_channels=channels, out_channels=channels, num_heads=2)
    torch.manual_seed(0)
    model = FourFlowDiffuser(config, DiffuserParts.for_flow("image", ["text", "image"])).eval().requires_grad_(False)
    fast = accelerate_diffuser(copy.deepcopy(model), compile=True, compile_backend="eager")
    x, t = tiny_inputs["x_image"], tiny_inputs["t_pair"]
    graphs = []
    for ratios in [(0.3, 0.7), (0.5, 0.5), (0.2, 0.9), (1.0, 3.0)]:
        contexts = [
            ContextInput("text", tiny_inputs["ctx_text_rand"], ratios[0]),
            ContextInput("image", tiny_inputs["ctx_image_rand"], ratios[1]),
        ]
        with torch.no_grad():
            assert_close_ref(fast(x, t, contexts), model(x, t, contexts), SAME, f"ratios {ratios}")
        graphs.append(counters["stats"]["unique_graphs"])
    # One recompilation for the second ratio set (which also shows compilation is active), none after.
    assert graphs[0] < graphs[1] == graphs[2] == graphs[3], f"graphs compiled so far after each ratio set: {graphs}"


@pytest.mark.skipif(
    os.environ.get("VD_COMPILE_TESTS") != "1",
    reason="Inductor compiles the tiny diffuser for ~90 s on a 2-core CPU; set VD_COMPILE_TESTS=1 to run",
)
def test_inductor_forward_equals_plain_and_fills_the_cache(plain, apply_model, tiny_inputs, tmp_path, fresh_dynamo):
    fast = accelerate_diffuser(copy.deepcopy(plain), compile=True, cache_dir=tmp_path / "inductor")
    data, spec = CASES["eps_image_mc_text0p3_image0p7"]
    x, t, contexts = tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs)
    with torch.no_grad():
        eps = fast(x, t, contexts)
    assert_close_ref(eps, plain(x, t, contexts), SAME, "inductor vs plain")
    assert_close_ref(eps, apply_model["eps_image_mc_text0p3_image0p7"], 1e-4, "inductor vs official")
    assert any((tmp_path / "inductor").rglob("*.py")), "no compiled kernel was written to the cache directory"


@pytest.mark.parametrize("before", [None, "elsewhere"])
def test_compile_cache_scope_restores_the_process_setting(before, tmp_path, monkeypatch):
    if before is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / before))
    with compile_cache_scope(tmp_path / "own" / "inductor") as path:
        assert path == (tmp_path / "own" / "inductor").resolve() and path.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    expected = None if before is None else str(tmp_path / before)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == expected


def test_inductor_backend_keeps_its_cache_and_options_to_its_own_compilations(tmp_path, monkeypatch, fresh_dynamo):
    """Real Inductor (CPU, C++ kernels) on a two-op function: the kernels land in the backend's
    directory, while the process's cache directory and Inductor's settings stay as they were."""
    import torch._inductor.config as inductor_config

    process_dir = tmp_path / "process"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(process_dir))
    settings = (inductor_config.max_autotune, inductor_config.coordinate_descent_tuning, inductor_config.fx_graph_cache)
    seen = {}

    def observed(x):
        return torch.sin(x) * 2 + 1

    backend = inductor_backend("max-autotune-no-cudagraphs", tmp_path / "own")

    def spying_backend(graph_module, example_inputs):
        seen["before"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        compiled = backend(graph_module, example_inputs)
        seen["after"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return compiled

    fn = torch.compile(observed, backend=spying_backend)
    x = torch.linspace(-2, 2, 64)
    assert_close_ref(fn(x), observed(x), SAME, "inductor backend vs eager")
    assert seen["before"] == seen["after"] == str(process_dir)  # changed only inside the compilation
    assert any((tmp_path / "own").rglob("*.py")), "no compiled kernel in the backend's cache directory"
    assert not process_dir.exists() or not any(process_dir.rglob("*.py"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(process_dir)
    assert (inductor_config.max_autotune, inductor_config.coordinate_descent_tuning, inductor_config.fx_graph_cache) == settings


def test_bad_compile_settings_are_refused(plain):
    with pytest.raises(VDInputError, match="compile_mode must be one of"):
        accelerate_diffuser(plain, compile=True, compile_mode="fastest")
    with pytest.raises(VDInputError, match="max-autotune-no-cudagraphs"):
        accelerate_diffuser(plain, compile=True, compile_mode="reduce-overhead", cuda_graphs=True)


# ------------------------------------------------------------------------------ CUDA graphs


def test_graph_key_names_shapes_dtypes_devices_not_strides():
    a = torch.zeros(2, 4, 8, 8)
    assert graph_key("s", [a]) == graph_key("s", [a.contiguous(memory_format=torch.channels_last)])
    assert graph_key("s", [a]) != graph_key("s", [a[:1]])
    assert graph_key("s", [a]) != graph_key("s", [a.half()])
    assert graph_key("s", [a]) != graph_key("other", [a])


def test_cpu_tensors_run_eagerly(plain, apply_model, tiny_inputs):
    fast = accelerate_diffuser(copy.deepcopy(plain), cuda_graphs=True)
    data, spec = CASES["eps_text_imagectx"]
    with torch.no_grad():
        eps = fast(tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs))
    assert fast._runner.num_graphs == 0
    assert_close_ref(eps, apply_model["eps_text_imagectx"], 1e-4, "eager fallback")


def test_runner_replays_new_inputs_into_fixed_buffers():
    calls = []

    def fn(static, x, t):
        calls.append(static)
        return x * t[:, None] + static

    runner = CPURecorder(fn, max_graphs=2, warmup=2)
    with torch.inference_mode():
        first = runner(1.0, torch.ones(2, 3), torch.tensor([1.0, 2.0]))
        assert len(calls) == 4  # two warm-ups, the recording, its replay
        first.fill_(0)  # a caller may keep or change what it got: it is a copy
    with torch.no_grad():  # recorded under inference_mode, replayed under no_grad
        second = runner(1.0, torch.full((2, 3), 2.0), torch.tensor([3.0, 4.0]))
        assert torch.equal(second, torch.tensor([[7.0] * 3, [9.0] * 3]))
        assert len(calls) == 5 and runner.num_graphs == 1  # a replay, no new recording
        runner(1.0, torch.ones(4, 3), torch.ones(4))  # new batch: a second graph
        runner(2.0, torch.ones(4, 3), torch.ones(4))  # new static value: a third, the oldest dropped
        assert runner.num_graphs == 2
        assert graph_key(1.0, [torch.ones(2, 3), torch.ones(2)]) not in runner._graphs
    with torch.enable_grad():
        n = len(calls)
        runner(2.0, torch.ones(4, 3), torch.ones(4))
        assert len(calls) == n + 1  # eager: gradients cannot flow through a replay
    runner.release()
    assert runner.num_graphs == 0


@pytest.mark.parametrize("case", ["dual_s10", "i2t_s10"])
def test_graphed_ddim_replays_the_official_trajectory(case, plain, tiny_dir):
    """10 DDIM steps with guidance 7.5 through channels-last + recorded graphs (CPU recorder) land
    where the official sampler did and where the plain diffuser does. Unconditional image tokens:
    zeros for image data, CLIP of a black image for text data (README, ddim_<case>)."""
    ref = load_tensors(tiny_dir / f"ddim_{case}.safetensors")
    tokens = load_tensors(tiny_dir / "ddim_contexts.safetensors")
    if case == "dual_s10":
        cond = [ContextInput("text", tokens["text_c"], 0.3), ContextInput("image", tokens["image_c"], 0.7)]
        uncond = [ContextInput("text", tokens["text_u"]), ContextInput("image", torch.zeros_like(tokens["image_c"]))]
    else:
        cond, uncond = [ContextInput("image", tokens["image_c"])], [ContextInput("image", tokens["image_u_black"])]

    def run(diffuser):
        draws = iter(ref["step_noise"])
        with torch.no_grad():
            eps = GuidedEps(diffuser, cond, uncond, 7.5)
            return sample_ddim(eps, ref["x_init"], 10, noise=lambda like: next(draws))

    fast = accelerate_diffuser(copy.deepcopy(plain), channels_last=True, cuda_graphs=True)
    fast._runner = CPURecorder(fast._run, max_graphs=fast._runner.max_graphs)
    result = run(fast)
    assert fast._runner.num_graphs == 1  # one recording, nine replays
    # README parity for 10-step trajectories: 1e-3 (image) / 1e-2 (text flow) of max|ref|; the
    # plain path is far inside both (3e-6 and 2.3e-5 relative). The text flow amplifies rounding
    # differences ~10x more (README: 1 vs 2 threads moves i2t_s10 by 9e-4 of values up to 26).
    rel = 1e-4 if case == "dual_s10" else 1e-3
    assert_close_ref(result, ref["x_final"], rel, f"{case}: fast vs official")
    assert_close_ref(result, run(plain), SAME if case == "dual_s10" else 10 * SAME, f"{case}: fast vs plain")


def test_moved_weights_drop_recorded_graphs(plain, tiny_inputs):
    fast = accelerate_diffuser(copy.deepcopy(plain), cuda_graphs=True)
    fast._runner = CPURecorder(fast._run)
    data, spec = CASES["eps_image_textctx"]
    x, t, contexts = tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs)
    with torch.no_grad():
        fast(x, t, contexts)
        assert fast._runner.num_graphs == 1
        weight = fast.diffuser.image.data_blocks[0].get_submodule("0").weight
        weight.data = weight.data.clone()  # what an offloading host does behind the wrapper's back
        fast(x, t, contexts)
        assert fast._runner.num_graphs == 1  # the old graph was dropped, a new one recorded
        fast.to(torch.float32)  # .to() on the wrapper drops them too
        assert fast._runner.num_graphs == 0


def test_graphed_eps_is_optional():
    def eps(x, t):
        return x

    assert graphed_eps(eps, enabled=False) is eps
    wrapped = graphed_eps(eps)
    assert isinstance(wrapped, GraphedEps)
    assert torch.equal(wrapped(torch.ones(2, 3), torch.zeros(2)), torch.ones(2, 3))  # CPU: eager


# ------------------------------------------------------------------------------ on a GPU


@pytest.fixture
def strict_float32_cuda(monkeypatch):
    # README: TF32 convolutions/matmuls alone move float32 results by ≈1e-3.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return torch.device("cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["eps_image_mc_text0p3_image0p7", "eps_text_imagectx"])
def test_cuda_graph_replays_equal_eager(name, plain, apply_model, tiny_inputs, strict_float32_cuda):
    device = strict_float32_cuda
    eager = copy.deepcopy(plain).to(device)
    fast = accelerate_diffuser(copy.deepcopy(plain).to(device), channels_last=True, cuda_graphs=True)
    data, spec = CASES[name]
    x, t = tiny_inputs[data].to(device), tiny_inputs["t_pair"].to(device)
    contexts = [c._replace(tokens=c.tokens.to(device)) for c in contexts_for(spec, tiny_inputs)]
    generator = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        assert_close_ref(fast(x, t, contexts), apply_model[name], 1e-4, f"{name} recorded vs official")
        for _ in range(3):  # replays see new inputs
            x_new = torch.randn(x.shape, generator=generator, device=device)
            assert_close_ref(fast(x_new, t * 0.5, contexts), eager(x_new, t * 0.5, contexts), SAME, f"{name} replay")
        assert fast._runner.num_graphs == 1
        fast(torch.cat([x, x]), torch.cat([t, t]), [c._replace(tokens=torch.cat([c.tokens] * 2)) for c in contexts])
        assert fast._runner.num_graphs == 2


@needs_cuda
def test_graphed_guided_eps_equals_guided_eps(plain, tiny_dir, strict_float32_cuda):
    device = strict_float32_cuda
    model = copy.deepcopy(plain).to(device)
    ref = load_tensors(tiny_dir / "ddim_dual_s10.safetensors")
    contexts = {k: v.to(device) for k, v in load_tensors(tiny_dir / "ddim_contexts.safetensors").items()}
    cond = [ContextInput("text", contexts["text_c"], 0.3), ContextInput("image", contexts["image_c"], 0.7)]
    uncond = [ContextInput("text", contexts["text_u"]), ContextInput("image", contexts["image_u_black"])]

    def run(eps):
        draws = iter(ref["step_noise"].to(device))
        with torch.inference_mode():
            return sample_ddim(eps, ref["x_init"].to(device), 10, noise=lambda like: next(draws))

    graphed = GraphedEps(GuidedEps(model, cond, uncond, 7.5))
    result = run(graphed)
    assert graphed.runner.num_graphs == 1
    assert_close_ref(result, run(GuidedEps(model, cond, uncond, 7.5)), SAME, "graphed vs eager guided eps")
    assert_close_ref(result, ref["x_final"], 1e-4, "graphed vs official")


def test_accelerated_diffuser_is_a_drop_in_module(plain):
    fast = accelerate_diffuser(copy.deepcopy(plain))
    assert isinstance(fast, AcceleratedDiffuser) and isinstance(fast, torch.nn.Module)
    assert next(fast.parameters()).dtype == torch.float32
