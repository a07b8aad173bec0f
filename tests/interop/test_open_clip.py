"""open_clip interop: convert open_clip CoCa weights, reproduce its outputs, loss and greedy captions; round trip."""

import json

import pytest
import torch

import open_clip
from open_clip.coca_model import CoCa as OpenClipCoCa  # noqa: E402
from open_clip.loss import CoCaLoss as OpenClipCoCaLoss  # noqa: E402

import megacoca  # noqa: E402
from megacoca.cli import main as cli  # noqa: E402
from megacoca.losses import CoCaLoss  # noqa: E402
from megacoca.models.coca import CoCa  # noqa: E402
from megacoca.models.coca.generate import generate  # noqa: E402
from megacoca.models.coca.open_clip import (  # noqa: E402
    NotExpressibleError, config_from_open_clip, from_open_clip, open_clip_config, to_open_clip,
)

SOT, EOT = 62, 63  # the tiny configs' special ids (the CLIP BPE's are 49406 / 49407)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_open_clip_config(vision_width=64, embed_dim=32, **vision) -> dict:
    """A small open_clip CoCa. vision_width != embed_dim gives the pooler separate q/k/v weights."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": vision_width, "head_width": 16, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 9,
                       "output_tokens": True, **vision},
        "text_cfg": {"context_length": 14, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 14, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2,
                           "attn_pooler_heads": 4},
        "custom_text": True,
    }


def init_decoder_projection(model, std=None) -> None:
    """open_clip leaves its vocabulary projection as torch.empty memory; give it values."""
    projection = model.text_decoder.text_projection
    with torch.no_grad():
        projection.normal_(std=std if std is not None else projection.shape[0] ** -0.5)


def build_tiny(config: dict, seed: int = 0, std=None):
    torch.manual_seed(seed)
    model = OpenClipCoCa(**{k: v for k, v in config.items() if k != "custom_text"}).eval()
    init_decoder_projection(model, std)
    return model


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((reference.double() - value.double()).abs().max() / reference.double().abs().max()).item()


def random_text(batch, length, vocab, pad_lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, vocab - 2, (batch, length), generator=gen)
    for row, real in enumerate(pad_lengths):
        text[row, real:] = 0
    return text


def convert(tmp_path, model_arg: str, state: dict, as_checkpoint: bool = True, check: bool = True) -> str:
    path = tmp_path / "open_clip.pt"
    if as_checkpoint:  # open_clip's training checkpoint layout, DDP prefixes included
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    out = tmp_path / "converted"
    args = ["convert", "from-open-clip", "--model", model_arg, "--input", str(path), "--output", str(out)]
    assert cli(args + ([] if check else ["--no-check"])) == 0
    return str(out)


def check_outputs_match(reference, loaded, images, text, bar=1e-5):
    with torch.no_grad():
        expected = reference(images, text)
        got = loaded(images, text)
    for key in ("image_features", "text_features", "logits"):
        assert got[key].shape == expected[key].shape, key
        assert relative_error(expected[key], got[key]) <= bar, (key, relative_error(expected[key], got[key]))
    assert got["logit_scale"].shape == expected["logit_scale"].shape == ()
    torch.testing.assert_close(got["logit_scale"], expected["logit_scale"])
    assert torch.equal(got["labels"], expected["labels"])
    # The CoCa loss: open_clip's (2 x caption CE + 1 x CLIP) vs megacoca's from its training forward.
    their_loss = OpenClipCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(**expected)
    with torch.no_grad():
        our_total, parts = CoCaLoss(contrastive_weight=1.0, caption_weight=2.0)(loaded(images, text, caption_loss=True))
    assert relative_error(their_loss[0] + their_loss[1], our_total) <= bar
    assert relative_error(their_loss[1], 2.0 * parts["loss_caption"]) <= bar


@pytest.mark.parametrize("variant", ["split_pooler_weights", "fused_pooler_weights", "no_ln_pre_mlp_ratio"])
def test_tiny_custom_config_matches_open_clip(tmp_path, variant):
    options = {
        "split_pooler_weights": {},
        "fused_pooler_weights": dict(vision_width=32),
        "no_ln_pre_mlp_ratio": dict(no_ln_pre=True, mlp_ratio=2.5),
    }[variant]
    config = tiny_open_clip_config(**options)
    config_path = tmp_path / "coca_tiny_custom.json"
    config_path.write_text(json.dumps(config))
    reference = build_tiny(config)
    directory = convert(tmp_path, str(config_path), reference.state_dict())
    loaded = megacoca.load(directory, kernels="torch")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = random_text(3, 14, 64, pad_lengths=[5, 9, 14])
    check_outputs_match(reference, loaded, images, text)


@pytest.mark.slow  # ~15 s on one thread; more on a loaded machine
def test_coca_vit_b32_matches_open_clip(tmp_path):
    reference = open_clip.create_model("coca_ViT-B-32", pretrained=None).eval()
    init_decoder_projection(reference)
    assert sum(p.numel() for p in reference.parameters()) == 253_560_065
    # The CLI's own output check is exercised on the tiny configs; here the test does the full comparison.
    directory = convert(tmp_path, "coca_ViT-B-32", reference.state_dict(), check=False)
    loaded = megacoca.load(directory, kernels="torch")
    assert loaded.num_params() == 253_560_065
    tokenizer = megacoca.load_tokenizer(loaded)
    assert megacoca.load_tokenizer(directory).encode(["two dogs"]).tolist() == tokenizer.encode(["two dogs"]).tolist()
    text = tokenizer.encode(["a photo of a cat sitting on a red sofa", "two dogs"])
    assert torch.equal(text, open_clip.get_tokenizer("coca_ViT-B-32")(["a photo of a cat sitting on a red sofa",
                                                                       "two dogs"]))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    check_outputs_match(reference, loaded, images, text)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_gives_identical_tensors(tmp_path, suffix):
    config = tiny_open_clip_config()
    reference = build_tiny(config)
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(config))
    directory = convert(tmp_path, str(config_path), reference.state_dict(), as_checkpoint=False)
    out = tmp_path / "back" / f"tiny_export{suffix}"
    assert cli(["convert", "to-open-clip", "--input", directory, "--output", str(out)]) == 0
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        back = load_file(str(out))
    else:
        back = torch.load(out, weights_only=True)  # tensors only: no pickled code to trust
    original = reference.state_dict()
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].shape == tensor.shape and back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    # The exported model config builds the same open_clip model under the name of the file's stem.
    assert json.loads(out.with_suffix(".json").read_text())["vision_cfg"]["width"] == 64
    open_clip.add_model_config(str(out.with_suffix(".json")))
    rebuilt = open_clip.create_model("tiny_export", pretrained=str(out))
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in original.items())


def test_open_clip_directory_loads_as_local_dir_and_from_the_hub(tmp_path, monkeypatch):
    """`to-open-clip DIR` writes open_clip's hub layout: create_model_and_transforms loads it as "local-dir:DIR"
    and, uploaded as it is, as "hf-hub:ORG/REPO" (here: a hub cache holding it, offline). megacoca loads it too."""
    import huggingface_hub

    config = tiny_open_clip_config()
    reference = build_tiny(config)
    (tmp_path / "c.json").write_text(json.dumps(config))
    directory = convert(tmp_path, str(tmp_path / "c.json"), reference.state_dict(), as_checkpoint=False)
    out = tmp_path / "open_clip_dir"
    assert cli(["convert", "to-open-clip", "--input", directory, "--output", str(out)]) == 0
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someone--coca-tiny"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (repo / "snapshots" / revision / name).write_bytes((out / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, kwargs in ((f"local-dir:{out}", {}), ("hf-hub:someone/coca-tiny", {"cache_dir": str(tmp_path / "hub")})):
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in reference.state_dict().items()), name
        assert preprocess.transforms[0].size == 32
    back = megacoca.load(out, kernels="torch")
    assert back.tokenizer_info["eos_id"] == 49407
    assert all(torch.equal(back.state_dict()[k], v) for k, v in megacoca.load(directory).state_dict().items())


def test_adapter_functions_round_trip_in_memory():
    config = tiny_open_clip_config()
    reference = build_tiny(config)
    cfg = config_from_open_clip(config, kernels="torch")
    ours = CoCa(cfg)
    ours.load_state_dict(from_open_clip(reference.state_dict(), cfg), strict=True)
    assert ours.logit_scale.shape == (1,)
    back = to_open_clip(ours.state_dict(), cfg)
    assert back["logit_scale"].shape == ()
    assert all(torch.equal(back[k], v) for k, v in reference.state_dict().items())
    assert open_clip_config(cfg)["vision_cfg"]["attn_pooler_queries"] == 9
    with pytest.raises(KeyError, match="missing"):
        from_open_clip({k: v for k, v in reference.state_dict().items() if "ln_post" not in k}, cfg)


def test_unsupported_open_clip_options_are_refused():
    config = tiny_open_clip_config()
    config["quick_gelu"] = True
    config["text_cfg"]["ls_init_value"] = 1e-4
    with pytest.raises(ValueError, match="quick_gelu.*ls_init_value"):
        config_from_open_clip(config)


def test_paper_layout_is_refused_by_to_open_clip(tmp_path, capsys):
    from megacoca.models.coca import get_flavor
    from megacoca.models.coca.loading import save_pretrained

    cfg = get_flavor("coca_tiny")
    save_pretrained(CoCa(cfg), tmp_path / "paper")
    with pytest.raises(NotExpressibleError, match="pooler_layout='paper'"):
        open_clip_config(cfg)
    assert cli(["convert", "to-open-clip", "--input", str(tmp_path / "paper"), "--output", str(tmp_path / "x.pt")]) == 2
    assert "open_clip's CoCa cannot express this model" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_load_roundtrip_and_generate_binding(tmp_path):
    config = tiny_open_clip_config()
    reference = build_tiny(config)
    (tmp_path / "c.json").write_text(json.dumps(config))
    directory = convert(tmp_path, str(tmp_path / "c.json"), reference.state_dict())
    loaded = megacoca.load(directory)
    assert not loaded.training
    assert loaded.tokenizer_info["bos_id"] == 49406 and loaded.tokenizer_info["eos_id"] == 49407
    images = torch.randn(2, 3, 32, 32)
    out = loaded.generate(images, max_new_tokens=5, bos_id=SOT, eos_id=EOT)
    assert out.shape[0] == 2 and (out[:, 0] == SOT).all()
    features = loaded.encode_image(images)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_generation_matches_open_clip(seed):
    config = tiny_open_clip_config()
    reference = build_tiny(config, seed=seed, std=2.0)  # peaked next-token distributions
    cfg = config_from_open_clip(config, kernels="torch")
    ours = CoCa(cfg).eval()
    ours.load_state_dict(from_open_clip(reference.state_dict(), cfg))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 5))
    seq_len, min_seq_len = 12, 3

    def theirs(eos):
        return reference.generate(images, seq_len=seq_len, generation_type="top_k", top_k=1, sot_token_id=SOT,
                                  eos_token_id=eos, pad_token_id=0, min_seq_len=min_seq_len)

    # An eos id that row 0 emits mid-caption, so rows finish at different steps.
    probe = theirs(EOT)
    eos = int(probe[0, 5])
    expected = theirs(eos)
    # open_clip writes an eos at position seq_len - 1 if a row is still running; megacoca stops without one.
    got = generate(ours, images, max_new_tokens=seq_len - 2, min_new_tokens=min_seq_len - 1, bos_id=SOT,
                   eos_id=eos, pad_id=0)
    width = seq_len - 1
    expected = torch.nn.functional.pad(expected, (0, max(0, width - expected.shape[1])))[:, :width]
    got = torch.nn.functional.pad(got, (0, width - got.shape[1]))
    assert torch.equal(got, expected), (got, expected)
    assert ((got == eos).sum(1) > 0).sum() >= 1


def test_read_open_clip_state_formats(tmp_path):
    from safetensors.torch import save_file

    from megacoca.checkpoint.loader import read_open_clip_state

    state = build_tiny(tiny_open_clip_config()).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    for name in ("model.safetensors", "ckpt.pt"):
        read = read_open_clip_state(tmp_path / name)
        assert set(read) == set(state) and all(torch.equal(read[k], v) for k, v in state.items())
    torch.save([1, 2], tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="neither a state dict"):
        read_open_clip_state(tmp_path / "bad.pt")
