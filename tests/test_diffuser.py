"""The four-flow diffuser against the official outputs in tiny/ (algorithm.md §2.1, §3, §4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import APPLY_MODEL_CASES, assert_close_ref, contexts_for, half_precision_rel, load_tensors

from vd_core.diffuser import ContextInput, DiffuserConfig, DiffuserParts, FourFlowDiffuser
from vd_core.diffuser.layout import execution_order
from vd_core.diffuser.timestep import timestep_embedding
from vd_core.errors import MissingPartError, VDInputError


def test_timestep_embedding_matches_official(tiny_dir, tiny_config, tiny_model):
    ref = load_tensors(tiny_dir / "timestep_embedding.safetensors")
    width = tiny_config["diffuser_image"]["model_channels"]
    widths = sorted(int(key.removeprefix("sinusoid_")) for key in ref if key.startswith("sinusoid_"))
    assert width in widths  # the tiny model's own width, besides the full-size one
    for w in widths:
        assert_close_ref(timestep_embedding(ref["t"], w), ref[f"sinusoid_{w}"], 1e-5, f"sinusoid_{w}")
    assert_close_ref(tiny_model.image.time_embed(ref[f"sinusoid_{width}"]), ref["emb"], 1e-4, "time_embed")


@pytest.mark.parametrize("name", sorted(APPLY_MODEL_CASES))
def test_apply_model_matches_official(name, tiny_dir, tiny_model, tiny_inputs):
    expected = load_tensors(tiny_dir / "apply_model.safetensors")[name]
    data, spec = APPLY_MODEL_CASES[name]
    eps = tiny_model(tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs))
    assert eps.dtype == torch.float32
    assert_close_ref(eps, expected, 1e-4, name)


@pytest.mark.parametrize("name", ["eps_image_textctx", "eps_text_imagectx"])
def test_every_block_matches_official_trace(name, tiny_dir, tiny_model, tiny_inputs):
    trace = load_tensors(tiny_dir / "apply_model_trace.safetensors")
    call_order = json.loads((tiny_dir / "apply_model.json").read_text())["trace_call_order"][name]
    recorded = []
    hooks = [
        tiny_model.get_submodule(module_name.removeprefix("diffuser.")).register_forward_hook(
            lambda module, args, out, module_name=module_name: recorded.append((module_name, out))
        )
        for module_name in set(call_order)
    ]
    try:
        data, spec = APPLY_MODEL_CASES[name]
        tiny_model(tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs))
    finally:
        for hook in hooks:
            hook.remove()
    assert [module_name for module_name, _ in recorded] == call_order
    for call, (module_name, out) in enumerate(recorded):
        assert_close_ref(out, trace[f"{name}/{call:03d}/{module_name}"], 1e-4, f"{name} call {call} {module_name}")


def test_execution_order_matches_official(tiny_dir, tiny_model, ref_dir):
    tiny_orders = json.loads((tiny_dir / "apply_model.json").read_text())["layer_order"]
    full_orders = json.loads((ref_dir / "vd-four-flow-v1-0.summary.json").read_text())["diffuser_layers"]["image"]
    names = {"save_hidden_feature": "S", "load_hidden_feature": "L", "d": "d", "c": "c"}
    for orders, config in ((tiny_orders, tiny_model.config), (full_orders, DiffuserConfig.full_size())):
        official = [names[op] for key in ("i_order", "m_order", "o_order") for op in orders[key]]
        assert list(execution_order(config.layout)) == official


def test_multi_context_for_text_data_is_the_ratio_weighted_walk(tiny_dir, tiny_model, tiny_inputs):
    """The official multi-context walk crashes for text data (algorithm.md §4.3); ours follows the same
    formula h ← Σ r_i·block_i(h, c_i). Reference: the official loop written out here, with the
    official layer order from the fixture and numpy-normalised ratios."""
    orders = json.loads((tiny_dir / "apply_model.json").read_text())["layer_order"]
    x, t = tiny_inputs["x_text"], tiny_inputs["t_pair"]
    spec = [("image", 2.0), ("text", 1.0), ("image", 1.0)]
    contexts = contexts_for(spec, tiny_inputs)
    contexts[2] = contexts[2]._replace(tokens=torch.cat([tiny_inputs["ctx_image_rand"]] * 2, dim=1))  # 514 tokens
    ratios = [r / 4.0 for _, r in spec]

    emb = tiny_model.image.time_embed(timestep_embedding(t, tiny_model.config.model_channels))
    data = iter(tiny_model.text.data_blocks)
    context_lists = [iter(getattr(tiny_model, c.kind).context_blocks) for c in contexts]
    h, stack = x, []
    for op in orders["i_order"] + orders["m_order"] + orders["o_order"]:
        if op == "d":
            h = next(data)(h, emb)
        elif op == "c":
            blocks = [next(it) for it in context_lists]
            h = sum(block(h, c.tokens) * r for block, c, r in zip(blocks, contexts, ratios))
        elif op == "save_hidden_feature":
            stack.append(h)
        else:
            h = torch.cat([h, stack.pop()], dim=1)

    eps = tiny_model(x, t, contexts)
    assert_close_ref(eps, h, 1e-5, "text-data multi-context")
    assert (eps - tiny_model(x, t, contexts[:1])).abs().max() > 1e-3  # the mixing changes the result


def test_zero_ratio_context_leaves_single_context_result(tiny_dir, tiny_model, tiny_inputs):
    expected = load_tensors(tiny_dir / "apply_model.safetensors")["eps_text_imagectx"]
    contexts = contexts_for([("image", 1.0), ("text", 0.0)], tiny_inputs)
    assert_close_ref(tiny_model(tiny_inputs["x_text"], tiny_inputs["t_pair"], contexts), expected, 1e-4, "ratio 0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["eps_image_textctx", "eps_text_imagectx", "eps_image_mc_text0p3_image0p7"])
def test_half_precision_forward_is_close_to_float32(name, dtype, tiny_dir, tiny_state, tiny_model, tiny_inputs):
    """The timestep embedding is cast to the data dtype (official); norms and softmax are not upcast."""
    expected = load_tensors(tiny_dir / "apply_model.safetensors")[name]
    model = FourFlowDiffuser(tiny_model.config).to(dtype)
    model.load_state_dict(tiny_state)
    data, spec = APPLY_MODEL_CASES[name]
    rel = half_precision_rel(dtype, data)
    with torch.no_grad():
        eps = model(tiny_inputs[data].to(dtype), tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs))
    assert eps.dtype == dtype and torch.isfinite(eps).all()
    assert_close_ref(eps, expected, rel, f"{name} {dtype}")


def test_each_context_kind_takes_its_own_head_count(tiny_dir, tiny_state, tiny_config, tiny_inputs):
    """The official config gives each diffuser half its own head count: with the text half's count
    changed, the image-context runs stay exact and the text-context runs move."""
    from vd_core.diffuser import DiffuserConfig, FourFlowDiffuser

    heads = {kind: tiny_config[f"diffuser_{kind}"]["num_heads"] for kind in ("image", "text")}
    widths = DiffuserConfig.from_state_dict(tiny_state, num_heads=heads["image"]).level_widths
    other = next(h for h in range(heads["text"] - 1, 0, -1) if all(w % h == 0 for w in widths))
    config = DiffuserConfig.from_state_dict(tiny_state, num_heads=heads["image"], text_num_heads=other)
    model = FourFlowDiffuser(config).eval()
    model.load_state_dict(tiny_state, strict=True)
    assert model.image.context_blocks[0]._modules["0"].transformer_blocks[0].attn2.num_heads == heads["image"]
    assert model.text.context_blocks[0]._modules["0"].transformer_blocks[0].attn2.num_heads == other
    expected = load_tensors(tiny_dir / "apply_model.safetensors")
    for name in ("eps_image_imagectx", "eps_image_textctx"):
        data, spec = APPLY_MODEL_CASES[name]
        with torch.no_grad():
            out = model(tiny_inputs[data], tiny_inputs["t_pair"], contexts_for(spec, tiny_inputs))
        if spec[0][0] == "image":
            assert_close_ref(out, expected[name], 1e-4, name)
        else:
            assert (out - expected[name]).abs().max() > 1e-3, f"{name} ignored the text half's head count"


def test_only_requested_parts_are_built(tiny_model):
    text_to_image = FourFlowDiffuser(tiny_model.config, DiffuserParts.for_flow("image", ["text"]))
    prefixes = {".".join(k.split(".")[:2]) for k in text_to_image.state_dict()}
    assert prefixes == {"image.time_embed", "image.data_blocks", "text.context_blocks"}
    image_to_text = FourFlowDiffuser(tiny_model.config, DiffuserParts.for_flow("text", ["image"]))
    prefixes = {".".join(k.split(".")[:2]) for k in image_to_text.state_dict()}
    assert prefixes == {"image.time_embed", "text.data_blocks", "image.context_blocks"}


def test_missing_part_raises_with_its_name(tiny_model, tiny_state, tiny_inputs):
    model = FourFlowDiffuser(tiny_model.config, DiffuserParts.for_flow("image", ["text"]))
    model.load_state_dict({k: v for k, v in tiny_state.items() if k in model.state_dict()}, strict=True)
    x, t = tiny_inputs["x_image"], tiny_inputs["t_pair"]
    with pytest.raises(MissingPartError, match=r"diffuser\.image\.context_blocks.*image_context=True"):
        model(x, t, contexts_for([("image", 1.0)], tiny_inputs))
    with pytest.raises(MissingPartError, match=r"diffuser\.text\.data_blocks"):
        model(tiny_inputs["x_text"], t, contexts_for([("text", 1.0)], tiny_inputs))


def test_bad_inputs_raise(tiny_model, tiny_inputs):
    x, t = tiny_inputs["x_image"], tiny_inputs["t_pair"]
    with pytest.raises(VDInputError, match="at least one context"):
        tiny_model(x, t, [])
    with pytest.raises(VDInputError, match="non-zero sum"):
        tiny_model(x, t, contexts_for([("text", 0.0), ("image", 0.0)], tiny_inputs))
    with pytest.raises(VDInputError, match="image latents"):
        tiny_model(x[:, :, 0], t, contexts_for([("text", 1.0)], tiny_inputs))
    with pytest.raises(VDInputError, match="image latents have shape"):  # odd sides are fine, channels are not
        tiny_model(x[:, :-1], t, contexts_for([("text", 1.0)], tiny_inputs))
    width = tiny_inputs["x_text"].shape[1] - 1
    with pytest.raises(VDInputError, match=f"width {width}"):
        tiny_model(tiny_inputs["x_text"][:, :-1], t, contexts_for([("text", 1.0)], tiny_inputs))
    with pytest.raises(VDInputError, match="expected"):
        tiny_model(x, t, [ContextInput("text", tiny_inputs["ctx_text_rand"][..., :-1])])
    with pytest.raises(VDInputError, match="'image' or 'text'"):
        tiny_model(x, t, [ContextInput("audio", tiny_inputs["ctx_text_rand"])])


def test_diffuser_parts():
    assert DiffuserParts.for_flow("image", ["text"]) == DiffuserParts(True, False, False, True)
    assert DiffuserParts.for_flow("text", ["image", "text"]) == DiffuserParts(False, True, True, True)
    merged = DiffuserParts.for_flow("image", ["text"]) | DiffuserParts.for_flow("text", ["image"])
    assert merged == DiffuserParts.all()
    with pytest.raises(VDInputError):
        DiffuserParts.for_flow("audio", ["text"])


def test_full_size_on_meta_has_the_release_keys_and_sizes(ref_dir):
    manifest = {}
    for line in (ref_dir / "vd-four-flow-v1-0.keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith("diffuser."):
            manifest[key.removeprefix("diffuser.")] = tuple(int(s) for s in shape.split(",") if s)
    with torch.device("meta"):
        model = FourFlowDiffuser(DiffuserConfig.full_size())
    state = model.state_dict()
    assert list(state) == list(manifest)
    assert {k: tuple(v.shape) for k, v in state.items()} == manifest

    counts = json.loads((ref_dir / "vd-four-flow-v1-0.summary.json").read_text())["sub_components"]
    with torch.device("meta"):
        text_to_image = FourFlowDiffuser(DiffuserConfig.full_size(), DiffuserParts.for_flow("image", ["text"]))
    expected = sum(counts[f"diffuser.{p}"] for p in ("image.time_embed", "image.data_blocks", "text.context_blocks"))
    assert sum(p.numel() for p in text_to_image.parameters()) == expected  # ≈ 0.86 B of 2.57 B
