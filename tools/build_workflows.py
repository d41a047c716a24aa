"""Write the example workflows in ``workflows/`` (ComfyUI's UI format, schema version 0.4).

Each workflow is described below as nodes with their non-default widget values and links by
input/output *name*; ``workflow_graph.Workflow`` derives everything else.

Run from the repository root: ``.venv/bin/python tools/build_workflows.py``.
"""

from __future__ import annotations

import json

from workflow_graph import ROOT, Workflow, load_specs

MODEL_FILES = {
    "diffuser": "vd-four-flow-v1-0-fp16.pth",
    "optimus": "optimus-vae.pth",
    "clip": "clip-vit-large-patch14",
    "image_vae": "kl-f8.pth",
    "dtype": "auto",
}
INPUT_IMAGE = "example.png"  # ComfyUI ships input/example.png
FILES_NOTE = (
    "**Model files** (Versatile Diffusion release): `vd-four-flow-v1-0-fp16.pth` and `optimus-vae.pth` in "
    "`models/versatile_diffusion/`, `kl-f8.pth` in `models/vae/` (or `models/versatile_diffusion/`), the "
    "`clip-vit-large-patch14` folder (Hugging Face openai/clip-vit-large-patch14) in `models/clip_vision/`; "
    "for text outputs the Optimus tokenizers in `models/versatile_diffusion/optimus_tokenizers/` "
    "(`bert-base-cased/vocab.txt`, `gpt2/vocab.json`, `gpt2/merges.txt`). "
    "`python -m vd_core download --models models/versatile_diffusion` fetches them all."
)


def loader(wf: Workflow, **parts) -> int:
    return wf.add("VDLoader", **{**MODEL_FILES, **parts})


def text_to_image(specs) -> Workflow:
    wf = Workflow("vd_text_to_image", specs)
    ld = loader(wf, image_model="text", optimus="none")
    ctx = wf.add("VDCLIPTextContext", prompt="a red sports car on a mountain road, golden hour, photo")
    smp = wf.add("VDTextToImage", batch_size=2)
    dec, save = wf.add("VAEDecode"), wf.add("SaveImage", filename_prefix="VD/text_to_image")
    wf.link(ld, "vd_clip", ctx, "clip")
    wf.link(ld, "model", smp, "model")
    wf.link(ctx, "context", smp, "context")
    wf.link(smp, "latent", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")
    wf.note("# VD Text to Image\nThe official text-to-image flow: 50 DDIM steps, guidance 7.5, 512×512.\n\n" + FILES_NOTE)
    return wf


def image_variation(specs) -> Workflow:
    wf = Workflow("vd_image_variation", specs)
    ld = loader(wf, image_model="image", optimus="none")
    img = wf.add("LoadImage", image=INPUT_IMAGE)
    ctx = wf.add("VDCLIPImageContext", focus=0.4)
    enc = wf.add("VAEEncode")
    smp = wf.add("VDImageVariation", fidelity=0.2)
    dec = wf.add("VAEDecode")
    color = wf.add("VDColorMatch")
    save = wf.add("SaveImage", filename_prefix="VD/image_variation")
    wf.link(img, "IMAGE", ctx, "image")
    wf.link(ld, "vd_clip", ctx, "clip")
    wf.link(img, "IMAGE", enc, "pixels")
    wf.link(ld, "vae", enc, "vae")
    wf.link(ld, "model", smp, "model")
    wf.link(ctx, "context", smp, "context")
    wf.link(enc, "LATENT", smp, "latent")
    wf.link(smp, "latent", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", color, "image")
    wf.link(img, "IMAGE", color, "reference")
    wf.link(color, "image", save, "images")
    wf.note("# VD Image Variation\nFocus (CLIP Image Context): < 0.5 semantic, > 0.5 style. Fidelity (sampler): "
            "how much of the input's layout survives (needs the VAE Encode latent). Color Match is the WebUI's "
            "'Simple' colour adjustment.\n\n" + FILES_NOTE)
    return wf


def _text_output(wf: Workflow, ld: int, sampler: int, decode_title: str | None = None) -> int:
    decode = wf.add("VDOptimusTextDecode", title=decode_title)  # shows its sentences on the node
    wf.link(ld, "vd_optimus", decode, "optimus")
    wf.link(sampler, "text_latent", decode, "text_latent")
    return decode


def image_to_text(specs) -> Workflow:
    wf = Workflow("vd_image_to_text", specs)
    ld = loader(wf, image_model="none", text_model="image", image_vae="none")
    img = wf.add("LoadImage", image=INPUT_IMAGE)
    ctx = wf.add("VDCLIPImageContext")
    smp = wf.add("VDImageToText")
    wf.link(img, "IMAGE", ctx, "image")
    wf.link(ld, "vd_clip", ctx, "clip")
    wf.link(ld, "text_model", smp, "model")
    wf.link(ctx, "context", smp, "context")
    _text_output(wf, ld, smp)
    wf.note("# VD Image to Text\nFour captions of the image from VD's text flow, decoded by Optimus and cleaned "
            "of repeated words, as in the official WebUI.\n\n" + FILES_NOTE)
    return wf


def text_variation(specs) -> Workflow:
    wf = Workflow("vd_text_variation", specs)
    ld = loader(wf, image_model="none", text_model="text", image_vae="none")
    ctx = wf.add("VDCLIPTextContext", prompt="a cat sitting on a wooden bench in the park")
    smp = wf.add("VDTextVariation")
    wf.link(ld, "vd_clip", ctx, "clip")
    wf.link(ld, "text_model", smp, "model")
    wf.link(ctx, "context", smp, "context")
    _text_output(wf, ld, smp)
    wf.note("# VD Text Variation\nFour sentences similar to the prompt.\n\n" + FILES_NOTE)
    return wf


def dual_context(specs) -> Workflow:
    wf = Workflow("vd_dual_context", specs)
    ld = loader(wf, image_model="text+image", optimus="none")
    img = wf.add("LoadImage", image=INPUT_IMAGE)
    ictx = wf.add("VDCLIPImageContext")
    tctx = wf.add("VDCLIPTextContext", prompt="a watercolor painting")
    mix = wf.add("VDDualContextMixer", strength_1=0.7, strength_2=0.3)
    smp = wf.add("VDTextToImage", batch_size=2)
    dec, save = wf.add("VAEDecode"), wf.add("SaveImage", filename_prefix="VD/dual_context")
    wf.link(img, "IMAGE", ictx, "image")
    wf.link(ld, "vd_clip", ictx, "clip")
    wf.link(ld, "vd_clip", tctx, "clip")
    wf.link(ictx, "context", mix, "context_1")
    wf.link(tctx, "context", mix, "context_2")
    wf.link(ld, "model", smp, "model")
    wf.link(mix, "context", smp, "context")
    wf.link(smp, "latent", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")
    wf.note("# VD Dual Context\nAn image and a prompt guide one image. Strengths 0.7 / 0.3 = the WebUI's Dual-Context "
            "with text domination 0.3.\n\n" + FILES_NOTE)
    return wf


def multi_context(specs) -> Workflow:
    wf = Workflow("vd_multi_context_masks", specs)
    ld = loader(wf, image_model="text+image", optimus="none")
    slots = []
    for i, focus in ((1, 0.5), (2, 0.7)):
        img = wf.add("LoadImage", title=f"Image {i} (paint a mask in the mask editor)", image=INPUT_IMAGE)
        ctx = wf.add("VDCLIPImageContext", focus=focus)
        wf.link(img, "IMAGE", ctx, "image")
        wf.link(img, "MASK", ctx, "mask")
        wf.link(ld, "vd_clip", ctx, "clip")
        slots.append(ctx)
    tctx = wf.add("VDCLIPTextContext", prompt="a cozy cabin in a snowy forest")
    smp = wf.add("VDMultiContextSampler", text_strength=0.4)
    dec, save = wf.add("VAEDecode"), wf.add("SaveImage", filename_prefix="VD/multi_context")
    wf.link(ld, "vd_clip", tctx, "clip")
    wf.link(ld, "model", smp, "model")
    wf.link(slots[0], "context", smp, "image_1")
    wf.link(slots[1], "context", smp, "image_2")
    wf.link(tctx, "context", smp, "text")
    wf.link(smp, "latent", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")
    wf.note("# VD Multi Context with masks\nThe WebUI's Multi-Context: each image slot has its own mask (right-click "
            "Load Image → Open in MaskEditor; painted = left out), focus and weight; text strength 0.4 is the "
            "WebUI's Text Domination.\n\n" + FILES_NOTE)
    return wf


def i2t2i_edit(specs) -> Workflow:
    wf = Workflow("vd_i2t2i_edit", specs)
    ld = loader(wf, image_model="text+image", text_model="image")
    img = wf.add("LoadImage", image=INPUT_IMAGE)
    ictx = wf.add("VDCLIPImageContext")
    i2t = wf.add("VDImageToText", count=1)
    edit = wf.add("VDTextLatentEdit", positive="a snowy winter landscape", negative="a sunny summer day")
    decode = _text_output(wf, ld, edit, decode_title="Edited description")
    tctx = wf.add("VDCLIPTextContext", title="Edited description → context")
    mix = wf.add("VDDualContextMixer", strength_1=0.33, strength_2=0.67)
    smp = wf.add("VDTextToImage")
    dec = wf.add("VAEDecode")
    color = wf.add("VDColorMatch")
    save = wf.add("SaveImage", filename_prefix="VD/i2t2i")
    wf.link(img, "IMAGE", ictx, "image")
    wf.link(ld, "vd_clip", ictx, "clip")
    wf.link(ld, "text_model", i2t, "model")
    wf.link(ictx, "context", i2t, "context")
    wf.link(ld, "vd_optimus", edit, "optimus")
    wf.link(i2t, "text_latent", edit, "text_latent")
    wf.link(ld, "vd_clip", tctx, "clip")
    wf.link(decode, "text", tctx, "prompt")
    wf.link(ictx, "context", mix, "context_1")
    wf.link(tctx, "context", mix, "context_2")
    wf.link(ld, "model", smp, "model")
    wf.link(mix, "context", smp, "context")
    wf.link(smp, "latent", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", color, "image")
    wf.link(img, "IMAGE", color, "reference")
    wf.link(color, "image", save, "images")
    wf.note("# VD I2T2I: edit an image through its description\n1. Image to Text describes the image; 2. Text Latent "
            "Edit removes the negative phrase and adds the positive one in Optimus' latent space; 3. the edited "
            "sentence and the image (strengths 0.67 / 0.33, as the legacy I2T2I) guide the new image.\n\n" + FILES_NOTE)
    return wf


def ksampler(specs) -> Workflow:
    wf = Workflow("vd_ksampler", specs)
    ld = loader(wf, image_model="text", optimus="none")
    ctx = wf.add("VDCLIPTextContext", prompt="a lighthouse on a cliff at sunset, oil painting")
    cond = wf.add("VDContextToConditioning")
    empty = wf.add("EmptyLatentImage")
    ks = wf.add("KSampler", seed=20, steps=30, cfg=7.5, sampler_name="euler_ancestral", scheduler="karras")
    dec, save = wf.add("VAEDecode"), wf.add("SaveImage", filename_prefix="VD/ksampler")
    wf.link(ld, "vd_clip", ctx, "clip")
    wf.link(ctx, "context", cond, "context")
    wf.link(ld, "model", ks, "model")
    wf.link(cond, "positive", ks, "positive")
    wf.link(cond, "negative", ks, "negative")
    wf.link(empty, "LATENT", ks, "latent_image")
    wf.link(ks, "LATENT", dec, "samples")
    wf.link(ld, "vae", dec, "vae")
    wf.link(dec, "IMAGE", save, "images")
    wf.note("# VD with core KSampler\nThe VD Loader's MODEL is VD's image diffusion on ComfyUI's own SD 1.x UNet: every "
            "ComfyUI sampler and scheduler, hires fix, the latent nodes and model patches (LoRA, FreeU …) work on it. Both KSampler conditionings come from VD Context to "
            "Conditioning.\n\n" + FILES_NOTE)
    return wf


WORKFLOWS = (text_to_image, image_variation, image_to_text, text_variation, dual_context, multi_context,
             i2t2i_edit, ksampler)


def main() -> None:
    specs = load_specs()
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for build in WORKFLOWS:
        wf = build(specs)
        (out / f"{wf.name}.json").write_text(json.dumps(wf.to_ui(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote workflows/{wf.name}.json")


if __name__ == "__main__":
    main()
