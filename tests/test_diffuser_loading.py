"""Loading diffuser files of every layout, the converter, and every kind of bad file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import assert_close_ref, dual_ratios, load_tensors, release_config
from safetensors.torch import load_file, save_file

from vd_core.checkpoint import strip_prefix
from vd_core.convert import convert_diffuser, main
from vd_core.diffuser import ContextInput, DiffuserConfig, DiffuserParts, load_diffuser
from vd_core.diffuser.layout import legacy_key_map, legacy_layout, rename_by_prefix
from vd_core.errors import CheckpointError, MissingPartError

DDIM_CASES = {  # expected/README.md: flow data, [(kind, uncond key, cond key, ratio)]; dual: ratios of ddim.json
    "t2i": ("image", [("text", "text_u", "t2i_c", 1.0)]),
    "i2i": ("image", [("image", "image_u_zero", "i2i_c", 1.0)]),
    "i2t": ("text", [("image", "image_u_black", "i2t_c", 1.0)]),
    "t2t": ("text", [("text", "text_u", "t2t_c", 1.0)]),
    "dual": ("image", [("text", "text_u", "dual_text_c", None), ("image", "image_u_zero", "i2i_c", None)]),
}


@pytest.fixture(scope="module")
def tiny_heads(tiny_config):
    return tiny_config["diffuser_image"]["num_heads"]


@pytest.fixture(scope="module")
def diffuser_weights(tiny_weights):
    return {k: v for k, v in tiny_weights.items() if k.startswith("diffuser.")}


@pytest.fixture(scope="module")
def apply_model_ref(tiny_dir):
    return load_tensors(tiny_dir / "apply_model.safetensors")


def eps_image_textctx(model, inputs):
    return model(inputs["x_image"], inputs["t_pair"], [ContextInput("text", inputs["ctx_text_rand"])])


def assert_weights_equal(model, reference: dict, what: str):
    state = model.state_dict()
    assert set(state) == {k.removeprefix("diffuser.") for k in reference}, what
    for key, value in reference.items():
        assert torch.equal(state[key.removeprefix("diffuser.")], value.float()), f"{what}: {key}"


def test_config_from_shapes_matches_tiny_config(diffuser_weights, tiny_config, tiny_heads):
    config = DiffuserConfig.from_state_dict(strip_prefix(diffuser_weights, "diffuser."), num_heads=tiny_heads)
    image, text = tiny_config["diffuser_image"], tiny_config["diffuser_text"]
    assert config.model_channels == image["model_channels"] == text["model_channels"]
    assert config.channel_mult == tuple(image["channel_mult"])
    assert config.num_res_blocks == tuple(image["num_res_blocks"]) == tuple(text["num_noattn_blocks"])
    # attention_resolutions lists downsampling factors 2**level (algorithm.md §4.1).
    levels = range(len(image["channel_mult"]))
    assert config.context_levels == tuple(2**level in image["attention_resolutions"] for level in levels)
    assert config.context_levels == tuple(text["with_attn"])
    assert (config.in_channels, config.out_channels) == (image["in_channels"], image["out_channels"])
    assert config.context_dim == image["context_dim"]
    assert (config.text_latent_dim, config.second_dim) == (text["input_channels"], text["second_dim"][0])


def test_legacy_key_map_equals_the_reference_table(ref_dir):
    table = [line.split("\t") for line in (ref_dir / "vd-legacy-unet-keymap.tsv").read_text().splitlines()[1:]]
    with torch.device("meta"):
        from vd_core.diffuser import FourFlowDiffuser

        state = FourFlowDiffuser(DiffuserConfig.full_size()).state_dict()
    current_to_legacy = {new: old for old, new in legacy_key_map(DiffuserConfig.full_size().layout).items()}
    renamed, unmatched = rename_by_prefix(state, current_to_legacy)
    assert not unmatched
    generated = {(legacy, f"diffuser.{key}", ",".join(map(str, state[key].shape))) for key, legacy in renamed.items()}
    assert generated == {tuple(row) for row in table}


def test_full_size_config_from_shapes(ref_dir):
    """Levels 2 and 3 are both 1280 wide; context layers go to the finer one (algorithm.md §4.2). The
    pre-2023 layout names the positions explicitly and must agree."""
    with torch.device("meta"):
        from vd_core.diffuser import FourFlowDiffuser

        state = FourFlowDiffuser(DiffuserConfig.full_size()).state_dict()
    assert DiffuserConfig.from_state_dict(state) == DiffuserConfig.full_size()
    current_to_legacy = {new: old for old, new in legacy_key_map(DiffuserConfig.full_size().layout).items()}
    legacy_keys = rename_by_prefix(state, current_to_legacy)[0].values()
    for kind in ("image", "text"):
        assert legacy_layout(legacy_keys, kind) == DiffuserConfig.full_size().layout


@pytest.fixture(scope="module")
def release_model(release_dir):
    heads = release_config(release_dir)["diffuser_image"]["num_heads"]  # the release's fixed count
    return load_diffuser(release_dir / "vd-four-flow-v1-0-fp16.pth", num_heads=heads)


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
def test_release_fp16_file_reproduces_first_ddim_step(case, release_dir, release_model):
    """tiny_release/expected: the official model loaded from this fp16 file, run in float32; the
    first DDIM step's model call is [uncond; cond] at x_init and timesteps[0]."""
    model = release_model
    assert next(model.parameters()).dtype == torch.float32
    ref = load_tensors(release_dir / "expected" / f"ddim_{case}.safetensors")
    contexts = load_tensors(release_dir / "expected" / "ddim_contexts.safetensors")
    data_kind, spec = DDIM_CASES[case]
    if case == "dual":
        description = json.loads((release_dir / "expected" / "ddim.json").read_text())[case]["description"]
        spec = [(kind, u, c, ratio) for (kind, u, c, _), ratio in zip(spec, dual_ratios(description))]
    x = torch.cat([ref["x_init"]] * 2)
    t = torch.full((x.shape[0],), int(ref["timesteps"][0]))
    inputs = [ContextInput(kind, torch.cat([contexts[u], contexts[c]]), r) for kind, u, c, r in spec]
    eps_uncond, eps_cond = model(x, t, inputs).chunk(2)
    assert_close_ref(eps_uncond, ref["eps_uncond"][0], 1e-4, f"{case} uncond")
    assert_close_ref(eps_cond, ref["eps_cond"][0], 1e-4, f"{case} cond")


def write_layout(path, weights: dict, layout: str, dtype=None):
    """Write the tiny diffuser in one of the supported layouts."""
    weights = {k: v.to(dtype or v.dtype) for k, v in weights.items()}
    if layout == "legacy":
        config = DiffuserConfig.from_state_dict(strip_prefix(weights, "diffuser."), num_heads=1)  # heads: no key
        legacy = legacy_key_map(config.layout)
        renamed, unmatched = rename_by_prefix(strip_prefix(weights, "diffuser."), {v: k for k, v in legacy.items()})
        assert not unmatched
        weights = {renamed[k]: v for k, v in strip_prefix(weights, "diffuser.").items()}
        weights |= {"autokl.encoder.conv_in.weight": torch.zeros(1), "betas": torch.zeros(1000)}
    if str(path).endswith(".safetensors"):
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    return path


@pytest.mark.parametrize(
    ("name", "layout", "dtype"),
    [
        ("vd.pth", "release", None),
        ("vd-fp16.pth", "release", torch.float16),
        ("vd.safetensors", "release", None),
        ("vd-legacy.pth", "legacy", None),
    ],
)
def test_round_trip_and_convert(
    name, layout, dtype, tmp_path, diffuser_weights, tiny_heads, tiny_inputs, apply_model_ref
):
    src = write_layout(tmp_path / name, diffuser_weights, layout, dtype)
    reference = {k: v.to(dtype or v.dtype) for k, v in diffuser_weights.items()}
    model = load_diffuser(src, num_heads=tiny_heads)
    assert_weights_equal(model, reference, name)
    if dtype is None:
        assert_close_ref(eps_image_textctx(model, tiny_inputs), apply_model_ref["eps_image_textctx"], 1e-4, name)

    dst = convert_diffuser(src, tmp_path / "converted.safetensors")
    converted = load_file(str(dst))
    assert set(converted) == set(diffuser_weights)
    assert all(converted[k].dtype == (dtype or torch.float32) for k in converted)
    assert_weights_equal(load_diffuser(dst, num_heads=tiny_heads), reference, f"{name} converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "converted.safetensors"])


def test_all_in_one_state_dict_reads_only_the_diffuser(tiny_dir, diffuser_weights, tiny_heads, tmp_path):
    all_in_one = tiny_dir / "weights.safetensors"  # diffuser.* with vae.*, ctx.* and the schedule
    assert_weights_equal(load_diffuser(all_in_one, num_heads=tiny_heads), diffuser_weights, "all-in-one")
    dst = convert_diffuser(all_in_one, tmp_path / "d.safetensors", dtype=torch.bfloat16)
    assert set(load_file(str(dst))) == set(diffuser_weights)


def test_converter_command_line(tmp_path, diffuser_weights, tiny_heads):
    src = write_layout(tmp_path / "vd.pth", diffuser_weights, "release")
    dst = tmp_path / "vd-fp16.safetensors"
    assert main([str(src), str(dst), "--dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(str(dst)).values()} == {torch.float16}
    before = dst.stat().st_mtime_ns
    assert main([str(src), str(dst)]) == 1  # refuses to overwrite
    assert dst.stat().st_mtime_ns == before
    assert main([str(src), str(dst), "--force", "--dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(str(dst)).values()} == {torch.float32}
    assert main([str(src), str(tmp_path / "out.pth")]) == 1  # not .safetensors
    (tmp_path / "empty.pth").write_bytes(b"")
    assert main([str(tmp_path / "empty.pth"), str(tmp_path / "x.safetensors")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pth", "vd-fp16.safetensors", "vd.pth"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_interrupted_conversion_leaves_nothing(tmp_path, diffuser_weights, monkeypatch):
    import safetensors.torch

    src = write_layout(tmp_path / "vd.pth", diffuser_weights, "release")

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as half_written:
            half_written.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_diffuser(src, tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["vd.pth"]


def test_partial_loading_builds_only_the_requested_parts(release_dir, tiny_dir):
    parts = DiffuserParts.for_flow("image", ["text"])
    model = load_diffuser(release_dir / "vd-four-flow-v1-0-fp16.pth", parts=parts, dtype=torch.float16)
    lists = {".".join(k.split(".")[:2]) for k in model.state_dict()}
    assert lists == {"image.time_embed", "image.data_blocks", "text.context_blocks"}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.requires_grad for p in model.parameters())
    contexts = load_tensors(release_dir / "expected" / "ddim_contexts.safetensors")
    cases = json.loads((release_dir / "expected" / "ddim.json").read_text())
    x = torch.zeros(cases["t2i"]["shape"], dtype=torch.float16)
    t = torch.ones(x.shape[0], dtype=torch.long)
    with pytest.raises(MissingPartError, match="image-context"):
        model(x, t, [ContextInput("image", contexts["i2i_c"])])
    with pytest.raises(MissingPartError, match="text data"):
        model(torch.zeros(cases["t2t"]["shape"], dtype=torch.float16), t, [ContextInput("text", contexts["t2i_c"])])


def test_image_half_only_file(tmp_path, diffuser_weights, tiny_heads, tiny_inputs, apply_model_ref):
    half = {k: v for k, v in diffuser_weights.items() if k.startswith("diffuser.image.")}
    path = write_layout(tmp_path / "image-half.pth", half, "release")
    with pytest.raises(CheckpointError, match="holds only the image half"):
        load_diffuser(path, num_heads=tiny_heads)
    with pytest.raises(CheckpointError, match="holds only the image half"):
        load_diffuser(path, parts=DiffuserParts.for_flow("image", ["text"]), num_heads=tiny_heads)
    model = load_diffuser(path, parts=DiffuserParts.for_flow("image", ["image"]), num_heads=tiny_heads)
    eps = model(tiny_inputs["x_image"], tiny_inputs["t_pair"], [ContextInput("image", tiny_inputs["ctx_image_rand"])])
    assert_close_ref(eps, apply_model_ref["eps_image_imagectx"], 1e-4, "image half")


class _RunsCode:
    """An object whose unpickling would call :func:`_mark` (a pickle that needs code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_mark, (self.marker,))


def _mark(marker):
    open(marker, "w").close()


def test_bad_files_raise_checkpoint_errors(tmp_path, release_dir, diffuser_weights, tiny_heads):
    sd_like = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    cases = {
        "sd15.ckpt": (sd_like, "Stable Diffusion 1.x checkpoint"),
        "clip.safetensors": (
            {
                "text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
                "vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 3, 1, 1),
            },
            "CLIP model",
        ),
        "ctx_only.pth": (
            {"vae.image.encoder.conv_in.weight": torch.zeros(1), "ctx.text.model.logit_scale": torch.zeros(())},
            "no diffuser",
        ),
    }
    for name, (state, message) in cases.items():
        path = write_layout(tmp_path / name, state, "release")
        with pytest.raises(CheckpointError, match=message):
            load_diffuser(path)
    with pytest.raises(CheckpointError, match=r"kl-f8 image VAE \(kl-f8.pth\)"):
        load_diffuser(release_dir / "kl-f8.pth")
    with pytest.raises(CheckpointError, match=r"Optimus text VAE \(optimus-vae.pth\)"):
        load_diffuser(release_dir / "optimus-vae.pth")

    good = write_layout(tmp_path / "good.safetensors", diffuser_weights, "release").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    pth = write_layout(tmp_path / "good.pth", diffuser_weights, "release").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("truncated.safetensors", "truncated.pth", "empty.pth"):
        with pytest.raises(CheckpointError, match=name):
            load_diffuser(tmp_path / name, num_heads=tiny_heads)

    marker = tmp_path / "code-ran"
    payload = {"diffuser.image.time_embed.0.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}
    torch.save(payload, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="would run code"):
        load_diffuser(tmp_path / "code.pth")
    assert not marker.exists()


def _last_key(state: dict, prefix: str, suffix: str) -> str:
    """The key ``prefix<N>suffix`` with the highest block index N present in ``state``."""
    keys = [k for k in state if k.startswith(prefix) and k.endswith(suffix) and k[len(prefix):-len(suffix)].isdigit()]
    assert keys, f"no {prefix}N{suffix} in the fixture"
    return max(keys, key=lambda k: int(k[len(prefix):-len(suffix)]))


@pytest.mark.parametrize("edit", ["reshape", "drop", "extra"])
def test_damaged_diffuser_files(edit, tmp_path, diffuser_weights, tiny_heads):
    state = dict(diffuser_weights)
    proj_out = _last_key(state, "diffuser.text.context_blocks.", ".0.proj_out.weight")
    res_bias = _last_key(state, "diffuser.image.data_blocks.", ".0.out_layers.0.bias")  # a res block's
    extra = res_bias.replace("out_layers.0.bias", "extra.weight")
    if edit == "reshape":
        width = state[proj_out].shape[0]
        state[proj_out] = torch.zeros(width, width, 3, 3)  # a 3×3 kernel where the file has 1×1
        message = r"shapes contradict.*" + re.escape(proj_out.removeprefix("diffuser."))
    elif edit == "drop":
        del state[res_bias]
        message = r"missing 1 keys.*" + re.escape(res_bias.removeprefix("diffuser."))
    else:
        state[extra] = torch.zeros(2)
        message = r"unexpected 1 keys.*" + re.escape(extra.removeprefix("diffuser.").removesuffix(".weight"))
    path = write_layout(tmp_path / f"{edit}.safetensors", state, "release")
    with pytest.raises(CheckpointError, match=message):
        load_diffuser(path, num_heads=tiny_heads)
    with pytest.raises(CheckpointError, match=message):
        convert_diffuser(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
