"""Optimus text VAE (algorithm.md §6.2) against the official outputs in tiny/ and tiny_release/expected/."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import assert_close_ref, load_tensors, optimus_heads, release_config

from vd_core.errors import CheckpointError, TokenizerNotFoundError, VDInputError
from vd_core.optimus import OptimusVAE, load_optimus
from vd_core.optimus.decoding import caption_from_ids, clean_up_tokenization, filter_logits
from vd_core.optimus.tokenizers import BertWordPieceTokenizer

# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops (rows of 50260 logits) run several times faster on one thread than with
    intra-op threads that spin against each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_heads(tiny_config) -> dict:
    """The tiny model's head counts as ``load_optimus`` keywords (encoder and decoder may differ)."""
    return optimus_heads(tiny_config)


@pytest.fixture(scope="module")
def tokenizer_dir(release_dir):
    return release_dir / "optimus_tokenizers"


@pytest.fixture(scope="module")
def tiny_vae(tiny_dir, tokenizer_dir, tiny_heads) -> OptimusVAE:
    # All-in-one VD state dict: the Optimus weights are under 'vae.text.'.
    return load_optimus(tiny_dir / "weights.safetensors", tokenizer_dir=tokenizer_dir, **tiny_heads)


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir):
    return load_tensors(tiny_dir / "optimus.safetensors"), json.loads((tiny_dir / "optimus.json").read_text())


@pytest.fixture(scope="module")
def release_vae(release_dir) -> OptimusVAE:
    # Tokenizers found beside the file; the heads are the release's fixed ones, as the fixture says.
    return load_optimus(release_dir / "optimus-vae.pth", **optimus_heads(release_config(release_dir)))


@pytest.fixture(scope="module")
def release_ref(release_dir):
    exp = release_dir / "expected"
    return (load_tensors(exp / "optimus.safetensors"), json.loads((exp / "optimus.json").read_text()),
            load_tensors(exp / "inputs.safetensors"))


def _sampled_cases(tiny_ref):
    _, ref = tiny_ref
    return [(name, case) for name, case in ref["decode"].items() if "torch_seed" in case]


# ---------------------------------------------------------------------------------- tokenizers


def test_bert_word_pieces_and_ids_match_official(tiny_vae, tiny_ref, release_vae, release_ref):
    tensors, ref = tiny_ref
    bert = tiny_vae.tokenizers.bert
    for text, pieces in zip(ref["encode_texts"], ref["encode_wordpieces"]):
        assert bert.tokenize(text.lower())[:77] == pieces, text
    assert torch.equal(tiny_vae.tokenize(ref["encode_texts"]), tensors["encode_token_ids"])
    rel_tensors, rel_ref, _ = release_ref
    assert torch.equal(release_vae.tokenize(rel_ref["encode_texts"]), rel_tensors["encode_token_ids"])


def test_bert_tokenizer_edge_cases(tokenizer_dir):
    bert = BertWordPieceTokenizer(tokenizer_dir / "bert-base-cased" / "vocab.txt")
    assert bert.tokenize("x" * 101) == ["[UNK]"]  # longer than 100 characters
    # NUL and zero-width space (category Cf) removed; tab and no-break space are whitespace.
    assert bert.tokenize("a\u0000b\tc\u00a0d\u200bz") == ["a", "##b", "c", "d", "##z"]
    assert bert.tokenize("一人") == ["一", "人"]  # CJK split first (else "一", "##人")
    assert bert.tokenize("a$b^c`d") == ["a", "$", "b", "^", "c", "`", "d"]  # ASCII symbols are punctuation
    assert bert.tokenize("Café") == ["Café"]  # no lower-casing, no accent stripping


def test_gpt2_added_tokens_and_teacher_ids(release_vae, release_ref, tiny_ref):
    gpt2 = release_vae.tokenizers.gpt2
    special = tiny_ref[1]["gpt2_special_ids"]
    assert (gpt2.pad_id, [gpt2.bos_id], [gpt2.eos_id]) == (special["<PAD>"], special["<BOS>"], special["<EOS>"])
    assert len(gpt2) == special["len(tokenizer)"]
    tensors, ref, _ = release_ref
    ids = gpt2.encode(ref["teacher_text"])
    assert ids == tensors["teacher_ids"].tolist()
    assert gpt2.convert_ids_to_tokens(ids) == ref["teacher_tokens"]


def test_recorded_strings_equal_detokenised_recorded_ids(tiny_vae, tiny_ref, release_vae, release_ref):
    _, ref = tiny_ref
    for name, case in ref["decode"].items():
        got = [caption_from_ids(ids, tiny_vae.tokenizers.gpt2) for ids in case["ids"]]
        assert got == case["strings"], name
    _, rel_ref, _ = release_ref
    for name in ("greedy", "sampled_t1"):
        got = [caption_from_ids(ids, release_vae.tokenizers.gpt2) for ids in rel_ref[name]["ids"]]
        assert got == rel_ref[name]["strings"], name


def test_clean_up_rules():
    assert clean_up_tokenization(" a , b . c ? d ! e 's f n't g do not") == " a, b. c? d! e's fn't g don't"


# ------------------------------------------------------------------------------ encoder parity


def test_encode_latent_parity(tiny_vae, tiny_ref, release_vae, release_ref):
    tensors, ref = tiny_ref
    assert_close_ref(tiny_vae.encode(ref["encode_texts"]), tensors["encode_latent"], 1e-4, "tiny latent")
    rel_tensors, rel_ref, _ = release_ref
    assert_close_ref(release_vae.encode(rel_ref["encode_texts"]), rel_tensors["encode_latent"], 1e-4, "release latent")


def test_encode_rejects_bad_input(tiny_vae):
    with pytest.raises(VDInputError, match="empty"):
        tiny_vae.encode(["a cat", "  "])
    with pytest.raises(VDInputError, match="list of strings"):
        tiny_vae.encode("a cat")


# ------------------------------------------------------------------------------ decoder parity


def test_first_step_logits(tiny_vae, tiny_ref):
    tensors, _ = tiny_ref
    bos = torch.tensor([[tiny_vae.tokenizers.gpt2.bos_id]])
    with torch.no_grad():
        for i in range(tensors["first_step_logits"].shape[0]):
            logits = tiny_vae.decoder(bos, tensors["decode_latents"][i : i + 1])[0, -1]
            assert_close_ref(logits, tensors["first_step_logits"][i], 1e-4, f"first-step logits {i}")


def test_teacher_forced_greedy_sequence(tiny_vae, tiny_ref):
    tensors, _ = tiny_ref
    ids = tensors["decode_greedy/ids_0"]
    with torch.no_grad():
        logits = tiny_vae.decoder(ids[None, :-1], tensors["decode_latents"][:1])[0]
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0]
    assert_close_ref(logprob, tensors["greedy0_teacher_forced_logprob"], 1e-4, "teacher-forced log-prob")
    assert torch.equal(logits.argmax(-1), tensors["greedy0_teacher_forced_argmax"])


def test_greedy_ids_and_strings_exact(tiny_vae, tiny_ref):
    tensors, ref = tiny_ref
    latents = tensors["decode_latents"]
    expected = [tensors[f"decode_greedy/ids_{i}"].tolist() for i in range(latents.shape[0])]
    assert tiny_vae.generate_ids(latents, greedy=True, use_kv_cache=False) == expected  # the official loop
    assert tiny_vae.generate_ids(latents, greedy=True) == expected  # with the KV cache
    assert tiny_vae.decode(latents, greedy=True) == ref["decode"]["decode_greedy"]["strings"]


def test_sampled_tokens_are_kept_by_the_filter(tiny_vae, tiny_ref):
    """Teacher forcing: every recorded sampled token survives the official top_p=1.0 filter."""
    tensors, _ = tiny_ref
    latents = tensors["decode_latents"]
    for name, case in _sampled_cases(tiny_ref):
        for i, seq in enumerate(case["ids"]):
            seq = torch.tensor(seq)
            with torch.no_grad():
                logits = tiny_vae.decoder(seq[None, :-1], latents[i : i + 1])[0]
            filtered = filter_logits(logits / case["temperature"], top_k=0, top_p=1.0)
            assert (~torch.isfinite(filtered)).sum(-1).min() > 0, "top_p=1.0 must drop the float32 tail"
            kept = torch.isfinite(filtered.gather(-1, seq[1:, None])[:, 0])
            if len(seq) == 30:  # the last <EOS> overwrote a sampled token (length limit)
                kept = kept[:-1]
            assert bool(kept.all()), f"{name} latent {i}: recorded token not kept at {(~kept).nonzero().tolist()}"


def test_seeded_sampling_reproduces_official_ids(tiny_vae, tiny_ref):
    """A CPU generator seeded like the official torch.manual_seed gives the official tokens,
    with the KV cache and (for the shorter temperature-0.7 run, to keep the test fast) without."""
    tensors, _ = tiny_ref
    for name, case in _sampled_cases(tiny_ref):
        for use_kv_cache in (True, False) if case["temperature"] < 1 else (True,):
            g = torch.Generator().manual_seed(case["torch_seed"])
            ids = tiny_vae.generate_ids(tensors["decode_latents"], temperature=case["temperature"], generator=g,
                                        use_kv_cache=use_kv_cache)
            assert ids == case["ids"], (name, use_kv_cache)


def test_kv_cache_equals_full_recompute(tiny_vae, tiny_ref):
    tensors, _ = tiny_ref
    latents = tensors["decode_latents"]
    seq = tensors["decode_greedy/ids_0"]
    with torch.no_grad():
        full = tiny_vae.decoder(seq[None, :-1], latents[:1])[0]
        cache = tiny_vae.decoder.start_cache(latents[:1])
        steps = torch.cat([tiny_vae.decoder(seq[None, t : t + 1], latents[:1], cache)[0] for t in range(len(seq) - 1)])
    assert_close_ref(steps, full, 1e-5, "incremental vs full logits")
    for kwargs in (dict(greedy=True), dict(temperature=0.9, top_k=50, top_p=0.95, max_length=12)):
        with_cache = tiny_vae.generate_ids(latents[2:], generator=torch.Generator().manual_seed(3), **kwargs)
        without = tiny_vae.generate_ids(latents[2:], generator=torch.Generator().manual_seed(3), use_kv_cache=False,
                                        **kwargs)
        assert with_cache == without, kwargs


def test_max_length_and_top_k(tiny_vae, tiny_ref):
    tensors, _ = tiny_ref
    latents = tensors["decode_latents"]
    eos = tiny_vae.tokenizers.gpt2.eos_id
    for seq in tiny_vae.generate_ids(latents, greedy=True, max_length=5):
        assert len(seq) <= 5 and seq[-1] == eos and eos not in seq[:-1]
    logits = tensors["first_step_logits"][0]
    assert torch.isfinite(filter_logits(logits, top_k=7, top_p=0.0)).sum() == 7
    assert torch.equal(filter_logits(logits, top_k=0, top_p=0.0), logits)


def test_decode_rejects_bad_arguments(tiny_vae, tiny_ref):
    latents = tiny_ref[0]["decode_latents"]
    for bad in (latents[0], latents[:, :-1]):
        with pytest.raises(VDInputError, match="text latents"):
            tiny_vae.decode(bad)
    with pytest.raises(VDInputError, match="max_length"):
        tiny_vae.decode(latents, max_length=tiny_vae.decoder.config.max_positions + 1)
    with pytest.raises(VDInputError, match="temperature"):
        tiny_vae.decode(latents, temperature=0.0)


# ---------------------------------------------------------------------- release files end to end


def test_release_teacher_forced_logits(release_vae, release_ref):
    tensors, _, inputs = release_ref
    ids, latents = tensors["teacher_ids"], inputs["optimus_latents"]
    with torch.no_grad():
        for i in range(latents.shape[0]):
            logits = release_vae.decoder(ids[None, :-1], latents[i : i + 1])[0]
            if i == 0:
                assert_close_ref(logits, tensors["teacher_logits_0"], 1e-4, "teacher logits")
            logprob = torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0]
            assert_close_ref(logprob, tensors["teacher_logprob"][i], 1e-4, f"teacher log-prob {i}")
            assert torch.equal(logits.argmax(-1), tensors["teacher_argmax"][i])


def test_release_greedy_decode(release_vae, release_ref, release_dir):
    tensors, ref, inputs = release_ref
    latents = inputs["optimus_latents"]
    greedy = [tensors[f"greedy_ids_{i}"].tolist() for i in range(latents.shape[0])]
    assert release_vae.generate_ids(latents, greedy=True) == greedy
    assert release_vae.decode(latents, greedy=True) == ref["greedy"]["strings"]
    # The official sampled decode after the torch.manual_seed its note names (bit-identical logits needed).
    seed = int(re.search(r"manual_seed\((\d+)\)", ref["sampled_t1"]["note"]).group(1))
    assert release_vae.decode(latents, generator=torch.Generator().manual_seed(seed)) == ref["sampled_t1"]["strings"]
    # Text-flow results of the official sampler, greedily decoded (includes empty captions).
    texts = json.loads((release_dir / "expected" / "ddim.json").read_text())["greedy_decoded_text"]
    for case in ("i2t", "t2t"):
        expected = texts[case]
        x_final = load_tensors(release_dir / "expected" / f"ddim_{case}.safetensors")["x_final"]
        assert release_vae.decode(x_final, greedy=True) == expected, case


# ----------------------------------------------------------------------------- files and lookup


@pytest.mark.parametrize("name, kind", [("kl-f8.pth", "image VAE"), ("vd-four-flow-v1-0-fp16.pth", "diffuser"),
                                        ("clip-vit-large-patch14/model.safetensors", "CLIP")])
def test_wrong_kind_of_file(release_dir, name, kind):
    with pytest.raises(CheckpointError, match=kind):
        load_optimus(release_dir / name)


def test_strict_keys_and_optional_keys(release_dir, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(release_dir / "optimus-vae.pth", weights_only=True)
    state = {k: v.clone() for k, v in state.items()}
    tokenizers = release_dir / "optimus_tokenizers"
    # Masks and lm_head dropped: derivable / tied, so the file still loads and decodes the same.
    lean = {k: v for k, v in state.items() if not k.endswith(".attn.bias") and k != "decoder.lm_head.weight"}
    save_file(lean, tmp_path / "lean.safetensors")
    vae = load_optimus(tmp_path / "lean.safetensors", tokenizer_dir=tokenizers)
    assert vae.decoder.lm_head.weight is vae.decoder.transformer.wte.weight
    assert torch.equal(vae.decoder.lm_head.weight, state["decoder.lm_head.weight"])
    missing = {k: v for k, v in lean.items() if k != "encoder.pooler.dense.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="encoder.pooler.dense.bias"):
        load_optimus(tmp_path / "missing.safetensors", tokenizer_dir=tokenizers)
    save_file({**lean, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):
        load_optimus(tmp_path / "extra.safetensors", tokenizer_dir=tokenizers)
    with pytest.raises(VDInputError, match="num_heads"):
        load_optimus(tmp_path / "lean.safetensors", tokenizer_dir=tokenizers, gpt2_heads=5)


def _other_divisor(width: int, heads: int) -> int:
    """A head count that also divides ``width`` but is not ``heads`` (splits attention differently)."""
    return next(d for d in range(1, width + 1) if width % d == 0 and d != heads)


def test_encoder_and_decoder_head_counts_are_separate(release_dir, release_ref):
    """A model whose BERT and GPT-2 halves have different head counts loads, and each half uses its
    own: the right count for one half and a wrong one for the other leaves exactly that half exact."""
    tensors, ref, inputs = release_ref
    heads = optimus_heads(release_config(release_dir))
    path = release_dir / "optimus-vae.pth"
    ids, latent = tensors["teacher_ids"][None, :-1], inputs["optimus_latents"][:1]
    probe = load_optimus(path, **heads)
    width = {"bert_heads": probe.encoder.config.hidden_size, "gpt2_heads": probe.decoder.config.hidden_size}
    for right, wrong_half in (("bert_heads", "gpt2_heads"), ("gpt2_heads", "bert_heads")):
        mixed = {right: heads[right], wrong_half: _other_divisor(width[wrong_half], heads[wrong_half])}
        vae = load_optimus(path, **mixed)
        used = (vae.encoder.config.num_heads, vae.decoder.config.num_heads)
        assert used == (mixed["bert_heads"], mixed["gpt2_heads"])
        with torch.no_grad():
            latent_err = (vae.encode(ref["encode_texts"]) - tensors["encode_latent"]).abs().max().item()
            logits_err = (vae.decoder(ids, latent)[0] - tensors["teacher_logits_0"]).abs().max().item()
        exact, split_wrong = (latent_err, logits_err) if right == "bert_heads" else (logits_err, latent_err)
        assert exact <= 1e-4 * max(1.0, tensors["teacher_logits_0"].abs().max().item()), (right, exact)
        assert split_wrong > 1e-3, f"{wrong_half}={mixed[wrong_half]} was not used ({split_wrong:.2e})"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _model_alone(release_dir, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "optimus-vae.pth").symlink_to(release_dir / "optimus-vae.pth")
    return folder / "optimus-vae.pth"


def test_missing_tokenizers_raise(release_dir, tmp_path, empty_hf_cache):
    with pytest.raises(TokenizerNotFoundError, match="vocab.txt") as info:
        load_optimus(_model_alone(release_dir, tmp_path))
    assert "optimus_tokenizers" in str(info.value)


def test_tokenizer_lookup_official_names_and_hf_cache(release_dir, tmp_path, empty_hf_cache):
    src = release_dir / "optimus_tokenizers"
    files = {"bert": (src / "bert-base-cased" / "vocab.txt",),
             "gpt2": (src / "gpt2" / "vocab.json", src / "gpt2" / "merges.txt")}
    official = tmp_path / "vocab"  # the official repository's file names
    official.mkdir()
    official_names = ("bert-base-cased-vocab.txt", "gpt2-vocab.json", "gpt2-merges.txt")
    for name, target in zip(official_names, files["bert"] + files["gpt2"]):
        (official / name).symlink_to(target)
    model_path = _model_alone(release_dir, tmp_path)
    assert len(load_optimus(model_path, tokenizer_dir=official).tokenizers.gpt2) == 50260
    # A Hugging Face cache snapshot layout (read only, never downloaded).
    for repo, kind in (("models--google-bert--bert-base-cased", "bert"), ("models--openai-community--gpt2", "gpt2")):
        snapshot = empty_hf_cache / repo / "snapshots" / "abc123"
        snapshot.mkdir(parents=True)
        (empty_hf_cache / repo / "refs").mkdir()
        (empty_hf_cache / repo / "refs" / "main").write_text("abc123")
        for target in files[kind]:
            (snapshot / target.name).symlink_to(target)
    vae = load_optimus(model_path)
    assert os.path.realpath(vae.tokenizers.bert.vocab_file) == os.path.realpath(files["bert"][0])
