"""How much of the text's effect on ε an IP-Adapter's image tokens reproduce, per band of timesteps, for small and
large objects (docs/ip_adapter.md, "Ninth run"). On one-object VALIDATION references, each noised at a t drawn in
the band: r = ‖ε(image tokens, no text) − ε(full caption)‖² / ‖ε(no image, no text) − ε(full caption)‖², summed over
the references of one size. r = 0: the tokens do all the words do; r = 1: nothing. The denominator column is the
text's own effect, which says how much of an ε loss a band carries.

    python scripts/ip_adapter_timestep_share.py runs/nano-ip-adapter-v16/export runs/nano-clip-shape-prompts/export 192
"""

import random
import sys
from collections import defaultdict

import torch

from kandinsky3.checkpoints.ip_adapter import load_ip_adapter
from kandinsky3.diffusion import NoiseSchedule
from kandinsky3.training.recipes.base import load_frozen
from kandinsky3.world.captions import describe_object
from kandinsky3.world.dataset import float_pixels, to_tensor, world_sample

BANDS = range(0, 1000, 200)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    adapter_dir, clip_dir, num = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    base = load_frozen("nano", "cpu")
    unet, text = base.unet, base.text_encoder
    parts = load_ip_adapter(adapter_dir, unet.config, image_encoder=clip_dir)
    encoder, adapter = parts.encoder, parts.adapter.eval()
    adapter.attach(unet)
    schedule = NoiseSchedule.named("cosine")
    samples = [world_sample(i, "val", 64, num_objects=1) for i in range(num)]
    pixels = float_pixels(torch.stack([to_tensor(s.image) for s in samples]))
    rng = random.Random(0)
    captions = [describe_object(s.scene.objects[0], rng, p_size=1.0, p_position=1.0, p_color=1.0) for s in samples]
    sizes = [s.scene.objects[0].size for s in samples]
    sums = defaultdict(lambda: [0.0, 0.0])
    with torch.no_grad():
        latents = base.movq.encode_untiled(pixels).float()
        tokens = adapter.image_tokens(encoder(encoder.normalize(pixels)))
        ids, mask = text.tokenize(captions)
        context, mask = text.encode_ids(ids, mask)
        null, null_mask = text.null_context(context)
        words = (context, mask, None, text.prompt_lengths(mask))
        nothing = (null, null_mask, None, text.prompt_lengths(null_mask))
        for lo in BANDS:
            t = torch.randint(lo, lo + 200, (num,)).float()
            x_t = schedule.q_sample(latents, t.long(), torch.randn_like(latents))
            with_text = unet(x_t, t, *words)
            miss = (unet(x_t, t, *nothing, image_tokens=tokens, image_weight=1.0) - with_text).square().sum((1, 2, 3))
            effect = (unet(x_t, t, *nothing) - with_text).square().sum((1, 2, 3))
            for size, m, e in zip(sizes, miss.tolist(), effect.tolist()):
                sums[lo, size][0] += m
                sums[lo, size][1] += e
    print("t band      r small  r large   text effect small  large")
    for lo in BANDS:
        (ms, es), (ml, el) = sums[lo, "small"], sums[lo, "large"]
        print(f"[{lo:3d}, {lo + 200:4d})  {ms / es:7.3f}  {ml / el:7.3f}   {es:17.1f}  {el:5.1f}")


if __name__ == "__main__":
    main()
