"""Pretrain the embedded tiny CLIP: `python -m runners.pretrain [--steps N] [--out DIR]`.

rankbench compares adapters on a *pretrained* backbone, so the offline suite needs one. This trains a
small `transformers.CLIPModel` (both towers, 32x32 images) contrastively on procedurally rendered,
captioned shapes (tasks/render.py) and writes it with `save_pretrained` — model, word-level tokenizer and
image-processor config — to tasks/assets/tiny-clip, where `from_pretrained` loads it like a hub model.
Deterministic: same seed and thread count -> same weights.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from tasks import images, render
from tasks.models import ASSETS_DIR

log = logging.getLogger("rankbench.pretrain")
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0..3; eos != 2 so CLIP pools at the first <eos>
MAX_TOKENS = 16


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every caption, class-name and prompt word of the embedded suite.

    Downstream words the captions never use (digit names, textures, counts) are in the vocabulary but
    untrained, like rare words in a real CLIP: their prompts are distinct yet carry no knowledge."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = list(dict.fromkeys(render.caption_words() + images.image_words()))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_config(vocab_size: int, width: int = 128, layers: int = 4) -> CLIPConfig:
    common = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
              "num_attention_heads": 4}
    text = {**common, "vocab_size": vocab_size, "max_position_embeddings": MAX_TOKENS, "pad_token_id": 0,
            "bos_token_id": 2, "eos_token_id": 3}
    vision = {**common, "image_size": render.SIZE, "patch_size": 8, "num_channels": 3}  # 4x4 patches
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def image_processor() -> CLIPImageProcessor:
    """Pixels in [0, 255] -> [-1, 1]; saved with the model so tasks preprocess as for a hub CLIP."""
    return CLIPImageProcessor(
        size={"shortest_edge": render.SIZE}, crop_size={"height": render.SIZE, "width": render.SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def make_pool(n: int, seed: int) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """n rendered scenes (normalised pixels) and their attributes; captions are redrawn every batch."""
    rng = np.random.default_rng(seed)
    scenes = [render.sample_scene(rng) for _ in tqdm(range(n), desc="render", leave=False)]
    imgs, attrs = zip(*scenes, strict=True)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, list(attrs)


def consistency(attrs: list[dict[str, str]], said: list[dict[str, str]]) -> torch.Tensor:
    """M[i, j] = 1 if caption j is true of image i (every attribute it names matches)."""
    m = torch.ones(len(attrs), len(said))
    for j, s in enumerate(said):
        for key, val in s.items():
            m[:, j] *= torch.tensor([a[key] == val for a in attrs], dtype=torch.float32)
    return m


def contrastive_loss(model: CLIPModel, pixels: torch.Tensor, tokens: dict,
                     match: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with multi-positive targets (captions that also describe other images)."""
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    txt = F.normalize(model.text_projection(model.text_model(**tokens).pooler_output), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    i2t = -(F.log_softmax(logits, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
    t2i = -(F.log_softmax(logits, 0) * match / match.sum(0, keepdim=True)).sum(0).mean()
    return (i2t + t2i) / 2


def train(steps: int, batch_size: int, lr: float, pool_size: int,
          seed: int) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = CLIPModel(build_config(len(tokenizer)))
    pixels, attrs = make_pool(pool_size, seed)
    rng, gen = np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    bar = tqdm(range(steps), desc="pretrain tiny-clip")
    for step in bar:
        idx = torch.randint(len(attrs), (batch_size,), generator=gen)
        batch_attrs = [attrs[i] for i in idx.tolist()]
        texts, said = zip(*(render.caption(rng, **a) for a in batch_attrs), strict=True)
        tokens = tokenizer(list(texts), padding=True, return_tensors="pt")
        x = augment(pixels[idx], gen)
        loss = contrastive_loss(model, x, dict(tokens), consistency(batch_attrs, list(said)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            log.debug("step %d loss %.4f", step, loss.item())
    return model, tokenizer


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small brightness jitter: positions and colours are what captions name, so no flips or crops."""
    scale = 1.0 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5)
    return (x * scale).clamp(-1, 1)


def save(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> int:
    """Write model + tokenizer + image processor; returns the folder size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor().save_pretrained(out)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool-size", type=int, default=16000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)  # 1: robust on a shared machine, bit-reproducible
    ap.add_argument("--out", type=Path, default=ASSETS_DIR / "tiny-clip")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer = train(args.steps, args.batch_size, args.lr, args.pool_size, args.seed)
    size = save(model, tokenizer, args.out)
    log.info("wrote %s (%.2f MB) in %.0f s", args.out, size / 1e6, time.time() - t0)


if __name__ == "__main__":
    main()
