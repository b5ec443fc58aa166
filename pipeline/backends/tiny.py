"""Tiny random-weight SD3 and FLUX pipeline folders, built offline (nothing downloaded).

They have the files, classes and configs of the real models (three text encoders + tokenizers, VAE,
transformer, scheduler for SD3; two for FLUX), only tiny, so the tests and the benchmark run the exact code
path a real SD3.5-Medium or FLUX.1 folder takes. The tokenizers are written here: CLIP's from a byte-level
`vocab.json` + `merges.txt`, T5's from a small Unigram model trained with the `tokenizers` library; both are
loaded back with `from_pretrained(dir)` as diffusers does (in transformers 5.x the CLIP constructor's
`vocab_file=`/`merges_file=` arguments are silently ignored).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77
T5_VOCAB = 200
CORPUS = [
    "a photo of a red circle and a blue square", "a sign that says hello world", "two green triangles",
    "a cat sitting on a mat", "a dog to the left of a car", "a neon sign that says open late",
    "an old book with the title the quiet sea", "three yellow apples on a white table",
    "a poster that says welcome home", "a purple cup below a black clock", "a street at night in the rain",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer in CLIP's format; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["t h", "th e</w>", "o f</w>", "i n", "s a", "r e"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    tok = CLIPTokenizer.from_pretrained(folder)  # check it loads the way diffusers will load it
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A tiny Unigram tokenizer in T5's format (<pad> = 0, </s> = 1, <unk> = 2); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" +", " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=T5_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>"}))
    tok = T5TokenizerFast.from_pretrained(folder)
    return len(tok)


def _clip_encoder(vocab: int, seed: int, hidden: int = 16, proj: int = 16, *, projection: bool = True):
    """SD3 takes CLIPTextModelWithProjection (text_embeds), FLUX CLIPTextModel (pooler_output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # bos/eos/pad ids must be the tokenizer's: CLIP pools the hidden state at the first eos token
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=proj,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5_encoder(vocab: int, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, latent_channels: int, *, shift: float | None):
    """A one-level AutoencoderKL: 2x downsampling (vae_scale_factor = 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=1.5305, shift_factor=shift, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def _tokenizers(clip_slots: tuple[str, ...], t5_slot: str) -> tuple[dict, int, int]:
    """The pipeline's tokenizers, written locally and loaded back with `from_pretrained` (in transformers 5.x
    `CLIPTokenizer(vocab_file=...)` ignores its files): ({slot: tokenizer}, CLIP vocabulary, T5 vocabulary)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        clip_vocab = write_clip_tokenizer(tok_dir / "clip")
        t5_vocab = write_t5_tokenizer(tok_dir / "t5")
        tokenizers = {slot: CLIPTokenizer.from_pretrained(tok_dir / "clip") for slot in clip_slots}
        tokenizers[t5_slot] = T5TokenizerFast.from_pretrained(tok_dir / "t5")
    return tokenizers, clip_vocab, t5_vocab


def build_tiny_sd3(path: str | Path, *, seed: int = 0, resolution: int = 32) -> Path:
    """A StableDiffusion3Pipeline folder with random weights: images of `resolution` px, latents [4, r/2, r/2]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    tokenizers, clip_vocab, t5_vocab = _tokenizers(("tokenizer", "tokenizer_2"), "tokenizer_3")
    te1, te2 = _clip_encoder(clip_vocab, seed + 1), _clip_encoder(clip_vocab, seed + 2)
    joint = 32  # = T5 d_model; the CLIP states (16 + 16) are zero-padded to it, as in SD3
    te3 = _t5_encoder(t5_vocab, joint, seed + 3)
    torch.manual_seed(seed)
    latent = resolution // 2
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16,
        pooled_projection_dim=te1.config.projection_dim + te2.config.projection_dim, pos_embed_max_size=latent)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 4, 4, shift=0.0609), text_encoder=te1, text_encoder_2=te2, text_encoder_3=te3, **tokenizers)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux(path: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder with random weights (guidance-distilled like FLUX.1-dev unless told otherwise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    tokenizers, clip_vocab, t5_vocab = _tokenizers(("tokenizer",), "tokenizer_2")
    te1 = _clip_encoder(clip_vocab, seed + 1, projection=False)
    joint = 32
    te2 = _t5_encoder(t5_vocab, joint, seed + 2)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint, pooled_projection_dim=te1.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    # FLUX.1's scheduler: shift resolved from the image's token count (dynamic shifting)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer.eval(), scheduler=sched, vae=_vae(seed + 4, 4, shift=0.1159), text_encoder=te1,
        text_encoder_2=te2, **tokenizers)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ------------------------------------------------------------------------------ tiny reward models (CLIP family)
TINY_OPEN_CLIP = {  # an open_clip architecture, 32 px images; the text side uses open_clip's own BPE vocabulary
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_open_clip(folder: str | Path, *, name: str = "gdro-tiny-clip", seed: int = 0) -> dict[str, Path]:
    """A random open_clip model in both local layouts the `clip_score`/`aesthetic` rewards read: the config file
    `<name>.json` (for `model_config`) with the weights `weights.pt` (for `pretrained`), and an open_clip model
    folder `local/` (`open_clip_config.json` + `open_clip_pytorch_model.bin`, for `pretrained: local-dir:...`)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP, indent=1))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    local = folder / "local"
    local.mkdir(exist_ok=True)
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}, indent=1))
    torch.save(model.state_dict(), local / "open_clip_pytorch_model.bin")
    return {"model_config": config, "weights": weights, "local_dir": local, "name": name}


def build_tiny_clip_model(folder: str | Path, *, seed: int = 0) -> Path:
    """A random transformers `CLIPModel` + `CLIPProcessor` (32 px, our tiny byte-level tokenizer) saved with
    `save_pretrained`: the layout of a PickScore folder with its processor files beside it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_clip_tokenizer(Path(tmp))
        tok = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": CLIP_MAX_LENGTH,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder
