"""Finish the nano MoVQ run: take the run's final weights, rescale the latent space so |z| at the 99th
percentile is ≈ 1 (the official dynamic thresholding expects that), check the reconstruction is unchanged, and
write the export the diffusion config reads.

    python scripts/finish_nano_movq.py runs/nano-movq --factor 2.5
"""

import argparse

import torch
from safetensors.torch import load_file

from kandinsky3.checkpoints.io import save_safetensors
from kandinsky3.eval.metrics import movq_psnr
from kandinsky3.training.checkpointing import checkpoint_weights
from kandinsky3.training.recipes.movq import load_movq_export, rescale_latents
from kandinsky3.world.dataset import to_tensor, world_sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", default="runs/nano-movq")
    ap.add_argument("--factor", type=float, default=2.5)
    ap.add_argument("--weights", choices=["live", "ema"], default="live")
    args = ap.parse_args()
    movq = load_movq_export(f"{args.run}/export")  # the EMA export (and its config)
    if args.weights == "live":
        sd = load_file(checkpoint_weights(args.run))  # the newest complete checkpoint's live weights
        movq.load_state_dict({k.removeprefix("movq."): v for k, v in sd.items() if k.startswith("movq.")})
    images = torch.stack([to_tensor(world_sample(i, "test").image) for i in range(200)])
    before = movq_psnr(movq, images)
    z_before = movq.encode(images[:64]).abs().flatten().quantile(0.99).item()
    rescale_latents(movq, args.factor)
    after = movq_psnr(movq, images)
    z_after = movq.encode(images[:64]).abs().flatten().quantile(0.99).item()
    print(f"PSNR {before:.3f} → {after:.3f} dB; |z| q99 {z_before:.3f} → {z_after:.3f}")
    assert abs(before - after) < 0.01
    save_safetensors(movq.state_dict(), f"{args.run}/export/movq.safetensors")


if __name__ == "__main__":
    main()
