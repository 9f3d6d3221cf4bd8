"""The two training stages (autoencoder, then U-Net + text encoder) and their evaluation.

Determinism: every random draw of step ``k`` (which scenes, caption variants and drops,
timesteps, noise, the VAE's posterior sample) comes from a generator seeded by
``(seed, stage, k)``, never from a stream carried across steps, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would (given the same thread count).
The checkpoint holds the modules, the optimiser, the EMA copy and the step.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.generate.prompts import chunk_ids
from pipelines.generate.schedulers import make_scheduler
from pipelines.models.clip_tokenizer import load_tokenizer
from pipelines.models.families import SD1
from pipelines.training import data, models
from pipelines.training.state import Log, Meter, atomic_save, load, trained_vae


@dataclass
class Settings:
    """Everything that decides the result. Presets: ``PRESETS``; a run keeps its settings in ``config.json``."""

    size: str = "demo"  # model size: "demo" | "tiny"
    seed: int = 0
    # autoencoder
    vae_steps: int = 4000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # on the summed KL per image, against the summed reconstruction loss (SD's)
    vae_eval_images: int = 192
    vae_gate: tuple[float, float, float] = (0.97, 0.97, 0.93)  # colour, background, shape on reconstructions
    vae_extra_steps: int = 500  # a failed gate trains this much more (constant low lr), up to 3 times
    vae_stats_images: int = 1024  # images whose latent std sets the latent rescaling
    vae_bf16: bool = True
    # latent data set
    n_latents: int = 32768
    # U-Net + text encoder
    ldm_steps: int = 3000  # what the shipped demo was trained with (README.md here, "Budget")
    ldm_batch: int = 64
    ldm_lr: float = 5e-4
    ldm_warmup: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    eval_every: int = 500  # steps; 0: never during training
    eval_per_triple: int = 1
    # bookkeeping (not part of the result)
    checkpoint_seconds: float = 180.0
    log_every: int = 25

    def result_dict(self) -> dict:
        d = asdict(self)
        for k in ("checkpoint_seconds", "log_every", "eval_every"):
            d.pop(k)
        return d


PRESETS = {
    "demo": Settings(),
    "tiny": Settings(size="tiny", vae_steps=6, vae_batch=4, vae_eval_images=8, vae_gate=(0.0, 0.0, 0.0),
                     vae_extra_steps=0, vae_stats_images=32, n_latents=64, ldm_steps=6, ldm_batch=8, ldm_warmup=2,
                     eval_every=0, checkpoint_seconds=0.0, log_every=1),
}


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# --- stage 1: autoencoder ----------------------------------------------------------------------

def posterior(vae, x):
    """The VAE encoder's (mean, clamped log-variance) of x."""
    moments = vae.quant_conv(vae.encoder(x)).float()
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def _grad_l1(a, b):
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def vae_loss(vae, x, generator, kl_weight: float, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mean, logvar = posterior(vae, x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        rec = vae.decode(z).sample.float()
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    pixels = x[0].numel()
    loss = l1 + mse + _grad_l1(rec, x) + kl_weight * kl / pixels
    return loss, {"l1": l1.item(), "mse": mse.item()}


@torch.no_grad()
def reconstruct(vae, x, bf16: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mean, _ = posterior(vae, x)
        return vae.decode(mean).sample.float().clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def evaluate_vae(vae, settings: Settings) -> dict:
    """PSNR and the judge's scores on reconstructions of held-out scenes."""
    vae.eval()
    n = settings.vae_eval_images
    scenes = [data.make_scene(settings.seed, "heldout", i) for i in range(n)]
    x = data.to_model_range(np.stack([data.render(s) for s in scenes]))
    rec = torch.cat([reconstruct(vae, x[i:i + 64]) for i in range(0, n, 64)])
    mse = F.mse_loss(rec, x).item()
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))
    result = data.score(list(to_uint8(rec)), [(s.colour, s.shape, s.background) for s in scenes])
    vae.train()
    return {"psnr": psnr, **result}


def gate_passed(scores: dict, gate) -> bool:
    return scores["colour"] >= gate[0] and scores["background"] >= gate[1] and scores["shape"] >= gate[2]


def train_vae(state_dir: Path, settings: Settings, log: Log, stop_at: int | None = None) -> Path | None:
    """Stage 1. Returns ``vae_done.pt`` (normalised weights, latent statistics, gate scores).

    ``stop_at``: checkpoint and return None on reaching that step (as if interrupted)."""
    done_path = state_dir / "vae_done.pt"
    if done_path.exists():
        log("[vae] done already (vae_done.pt); skipping")
        return done_path
    ckpt_path = state_dir / "vae.pt"
    vae = models.build_vae(settings.size, settings.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, extensions = 0, 0
    if ckpt_path.exists():
        ck = load(ckpt_path)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, extensions = ck["step"], ck.get("extensions", 0)
        log(f"[vae] resumed at step {step} from {ckpt_path}")
    vae.train()

    def save():
        atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                     "extensions": extensions}, ckpt_path)

    while True:
        total = settings.vae_steps + extensions * settings.vae_extra_steps
        meter = Meter(step, total, settings.vae_batch)
        last_save = time.monotonic()
        while step < total:
            g = step_generator(settings.seed, "vae", step)
            indices = range(step * settings.vae_batch, (step + 1) * settings.vae_batch)
            x = data.to_model_range(data.batch_pixels(settings.seed, "train", indices))
            if step < settings.vae_steps:
                lr = cosine_lr(step, settings.vae_steps, settings.vae_lr, warmup=min(100, settings.vae_steps // 10 + 1))
            else:
                lr = settings.vae_lr * 0.1
            _set_lr(opt, lr)
            loss, parts = vae_loss(vae, x, g, settings.vae_kl_weight, settings.vae_bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            if stop_at is not None and step >= stop_at:
                save()
                log(f"[vae] stopped at step {step}")
                return None
            if step % settings.log_every == 0 or step == total:
                psnr = 10 * math.log10(4.0 / max(parts["mse"], 1e-12))
                log(f"[vae] step {step}/{total} loss {loss.item():.4f} l1 {parts['l1']:.4f} "
                    f"psnr {psnr:.1f} dB lr {lr:.2e} {meter.line(step)}")
            if settings.checkpoint_seconds and time.monotonic() - last_save >= settings.checkpoint_seconds:
                save()
                last_save = time.monotonic()
            if step % 500 == 0 and step < total:
                s = evaluate_vae(vae, settings)
                log(f"[vae] eval step {step}: psnr {s['psnr']:.2f} dB colour {s['colour']:.3f} "
                    f"background {s['background']:.3f} shape {s['shape']:.3f}")
        save()
        scores = evaluate_vae(vae, settings)
        log(f"[vae] gate at step {step}: psnr {scores['psnr']:.2f} dB colour {scores['colour']:.3f} "
            f"background {scores['background']:.3f} shape {scores['shape']:.3f} (needs {settings.vae_gate})")
        if gate_passed(scores, settings.vae_gate) or extensions >= 3 or settings.vae_extra_steps <= 0:
            break
        extensions += 1
        log(f"[vae] gate not met: {settings.vae_extra_steps} more steps (extension {extensions}/3)")
    passed = gate_passed(scores, settings.vae_gate)
    if not passed:
        log("[vae] WARNING: the autoencoder did not reach its gate; the U-Net cannot do better than it")

    # Normalise the latent space inside the weights so SD 1.x's 0.18215 is right for it.
    vae.eval()
    with torch.no_grad():
        stats_indices = range(10**7, 10**7 + settings.vae_stats_images)
        x = data.to_model_range(data.batch_pixels(settings.seed, "train", stats_indices))
        means = torch.cat([posterior(vae, x[i:i + 128])[0] for i in range(0, len(x), 128)])
    std = means.std().item()
    c = models.normalise_vae_latents(vae, std)
    log(f"[vae] latent std {std:.4f} (mean {means.mean().item():+.4f}); latents rescaled by {c:.4f} "
        f"so the SD 1.x scaling factor {models.SD1_SCALING_FACTOR} gives unit variance")
    atomic_save({"model": vae.state_dict(), "step": step, "scores": scores, "gate_passed": passed,
                 "latent_std_before": std, "rescale": c}, done_path)
    return done_path


# --- latents ------------------------------------------------------------------------------------

def tokenizer():
    return load_tokenizer(SD1.text_encoders[0])


def token_ids(tok, texts: list[str]) -> torch.Tensor:
    """[n, 77] ids exactly as the engine builds them (BOS, tokens, EOS, EOS padding)."""
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False, truncation=False).input_ids[:75]
        rows.append(chunk_ids(tok, ids))
    return torch.tensor(rows, dtype=torch.int32)


def encode_dataset(state_dir: Path, settings: Settings, log: Log) -> Path:
    """The U-Net's data set: ``n_latents`` training scenes, encoded once (posterior mean and std,
    scaled by 0.18215) with four tokenised caption variants each."""
    path = state_dir / "latents.pt"
    if path.exists():
        log("[latents] present already (latents.pt); skipping")
        return path
    vae = trained_vae(state_dir, settings.size, settings.seed)
    tok = tokenizer()
    n, chunk = settings.n_latents, 256
    means, stds, ids = [], [], []
    t0 = time.monotonic()
    with torch.no_grad():
        for start in range(0, n, chunk):
            idx = range(start, min(n, start + chunk))
            scenes = [data.make_scene(settings.seed, "train", i) for i in idx]
            x = data.to_model_range(np.stack([data.render(s) for s in scenes]))
            mean, logvar = posterior(vae, x)
            means.append(mean * models.SD1_SCALING_FACTOR)
            stds.append(torch.exp(0.5 * logvar) * models.SD1_SCALING_FACTOR)
            variants = [c for s in scenes for c in s.captions()]
            ids.append(token_ids(tok, variants).view(len(scenes), 4, -1))
            if (start // chunk) % 16 == 0:
                done = start + len(idx)
                log(f"[latents] {done}/{n} encoded ({done / (time.monotonic() - t0):.0f} img/s)")
    mean, std = torch.cat(means), torch.cat(stds)
    log(f"[latents] done: scaled latent mean {mean.mean().item():+.4f} std {mean.std().item():.4f}")
    atomic_save({"mean": mean, "std": std, "ids": torch.cat(ids), "empty": token_ids(tok, [""])[0]}, path)
    return path


# --- stage 2: U-Net + text encoder ------------------------------------------------------------

def ddpm_alphas_cumprod() -> torch.Tensor:
    """SD's training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids.long()).last_hidden_state


def ldm_loss(unet, text_encoder, lat, settings: Settings, step: int, acp: torch.Tensor):
    g = step_generator(settings.seed, "ldm", step)
    n, b = lat["mean"].shape[0], settings.ldm_batch
    idx = torch.randint(n, (b,), generator=g)
    variant = torch.randint(4, (b,), generator=g)
    drop = torch.rand(b, generator=g) < settings.caption_dropout
    t = torch.randint(0, 1000, (b,), generator=g)
    eps_post = torch.randn(lat["mean"][idx].shape, generator=g)
    noise = torch.randn(lat["mean"][idx].shape, generator=g)
    x0 = lat["mean"][idx] + lat["std"][idx] * eps_post
    ids = lat["ids"][idx, variant]
    ids = torch.where(drop[:, None], lat["empty"][None].expand_as(ids), ids)
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    context = encode_text(text_encoder, ids)
    pred = unet(xt, t, encoder_hidden_states=context).sample
    per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    if settings.min_snr_gamma:
        snr = acp[t] / (1 - acp[t])
        per = per * torch.clamp(snr, max=settings.min_snr_gamma) / snr
    return per.mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def sample_images(unet, text_encoder, vae, prompts: list[str], seeds: list[int], steps: int = 20,
                  cfg: float = 6.0, sampler: str = "DPM++ 2M") -> np.ndarray:
    """txt2img at 64x64 the way the engine does it (same noise, schedule and sampler table)."""
    tok = tokenizer()
    cond = encode_text(text_encoder, token_ids(tok, prompts))
    uncond = encode_text(text_encoder, token_ids(tok, [""])).expand_as(cond)
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    scheduler = make_scheduler(sampler, "Automatic", {**SD1.scheduler, "prediction_type": "epsilon"})
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        pred = unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=context).sample
        pu, pc = pred.chunk(2)
        latents = scheduler.step(pu + cfg * (pc - pu), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return to_uint8(images)


def heldout_prompts(per_triple: int = 1) -> tuple[list[str], list[tuple[str, str, str]], list[int]]:
    prompts, expected, seeds = [], [], []
    for k in range(per_triple):
        for i, (c, s, b) in enumerate(data.HELD_OUT):
            prompts.append(data.simple_caption(c, s, b))
            expected.append((c, s, b))
            seeds.append(1000 * k + i)
    return prompts, expected, seeds


@torch.no_grad()
def evaluate_ldm(unet, text_encoder, vae, per_triple: int = 1, cfg: float = 6.0) -> dict:
    prompts, expected, seeds = heldout_prompts(per_triple)
    images = []
    for i in range(0, len(prompts), 24):
        images.extend(sample_images(unet, text_encoder, vae, prompts[i:i + 24], seeds[i:i + 24], cfg=cfg))
    return data.score(images, expected)


def train_ldm(state_dir: Path, settings: Settings, log: Log, stop_at: int | None = None) -> Path | None:
    """Stage 2. Returns ``ldm_done.pt`` (EMA weights of the U-Net and the text encoder).

    ``stop_at``: checkpoint and return None on reaching that step (as if interrupted)."""
    done_path = state_dir / "ldm_done.pt"
    ckpt_path = state_dir / "ldm.pt"
    if done_path.exists():
        done_step = load(done_path)["step"]
        if done_step == settings.ldm_steps:
            log("[ldm] done already (ldm_done.pt); skipping")
            return done_path
        if done_step > settings.ldm_steps:
            raise SystemExit(f"the U-Net stage already ran {done_step} steps; it cannot be cut to "
                             f"{settings.ldm_steps} (only the last EMA is kept): use --ldm-steps {done_step} or more")
        log(f"[ldm] extending the finished run from {done_step} to {settings.ldm_steps} steps")
        done_path.unlink()
    lat = load(state_dir / "latents.pt")
    unet, text = models.build_unet_and_text(settings.size, settings.seed)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=settings.ldm_lr, betas=(0.9, 0.999), weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    step = 0
    if ckpt_path.exists():
        ck = load(ckpt_path)
        for part, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"), (opt, "opt")):
            part.load_state_dict(ck[key])
        step = ck["step"]
        log(f"[ldm] resumed at step {step} from {ckpt_path}")
        if step > settings.ldm_steps:
            raise SystemExit(f"the U-Net stage is at step {step}, past --ldm-steps {settings.ldm_steps}: "
                             f"use --ldm-steps {step} or more")
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    unet.train()
    text.train()
    vae = None
    acp = ddpm_alphas_cumprod()

    def save():
        atomic_save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)

    total = settings.ldm_steps
    meter = Meter(step, total, settings.ldm_batch)
    last_save = time.monotonic()
    smooth = None
    while step < total:
        # constant after the warm-up (the EMA does the annealing), so the weights at step N
        # do not depend on the planned total: a run can be extended or cut short exactly
        lr = settings.ldm_lr * min(1.0, (step + 1) / settings.ldm_warmup)
        _set_lr(opt, lr)
        loss = ldm_loss(unet, text, lat, settings, step, acp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA warm-up (as in diffusers' EMAModel): short memory early, `ema_decay` later
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        step += 1
        if stop_at is not None and step >= stop_at:
            save()
            log(f"[ldm] stopped at step {step}")
            return None
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % settings.log_every == 0 or step == total:
            log(f"[ldm] step {step}/{total} loss {loss.item():.4f} (avg {smooth:.4f}) lr {lr:.2e} {meter.line(step)}")
        if settings.checkpoint_seconds and time.monotonic() - last_save >= settings.checkpoint_seconds:
            save()
            last_save = time.monotonic()
        if settings.eval_every and step % settings.eval_every == 0 and step < total:
            if vae is None:
                vae = trained_vae(state_dir, settings.size, settings.seed)
            t0 = time.monotonic()
            s = evaluate_ldm(ema_unet, ema_text, vae, settings.eval_per_triple)
            log(f"[ldm] eval step {step} (EMA, held-out, 20 steps DPM++ 2M, CFG 6): colour {s['colour']:.3f} "
                f"background {s['background']:.3f} shape {s['shape']:.3f} all {s['all']:.3f} "
                f"({time.monotonic() - t0:.0f} s)")
    save()
    atomic_save({"unet": ema_unet.state_dict(), "text": ema_text.state_dict(), "step": step}, done_path)
    log(f"[ldm] finished {step} steps")
    return done_path
