"""How a CLIP's image embedding carries the shape of one-object world renders (docs/ip_adapter.md, "Seventh runs").

A linear probe and a one-hidden-layer MLP probe (256 GELU units) are fitted on the image embeddings of ``num``
one-object train renders (three quarters; the rest test them), by object size. The IP-Adapter's image projection is
one linear map, so the linear figure is what it can read; the MLP figure says whether the shape is there at all.

    python scripts/clip_shape_probe.py runs/nano-clip-shape-prompts/export [num=8000]
"""

import sys

import torch
import torch.nn.functional as F

from kandinsky3.eval.ip_adapter import load_clip
from kandinsky3.models.clip import clip_embedders
from kandinsky3.world import SHAPES, world_sample


def probe_accuracy(model, x, y, small, fit: int, epochs: int = 100) -> tuple[float, float]:
    """Adam on the first ``fit`` rows, then the accuracy on the rest for (small, large) objects."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(fit).split(500):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        right = model(x[fit:]).argmax(1) == y[fit:]
    return right[small[fit:]].float().mean().item(), right[~small[fit:]].float().mean().item()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    folder, num = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    clip, tokenizer, processor = load_clip(folder)
    embed_images, _ = clip_embedders(clip, tokenizer, processor)
    samples = [world_sample(i, "train", clip.config.vision_config.image_size, num_objects=1) for i in range(num)]
    x = torch.cat([embed_images([s.image for s in samples[i : i + 250]]) for i in range(0, num, 250)])
    fit = num * 3 // 4
    x = (x - x[:fit].mean(0)) / x[:fit].std(0)
    y = torch.tensor([SHAPES.index(s.scene.objects[0].shape) for s in samples])
    small = torch.tensor([s.scene.objects[0].size == "small" for s in samples])
    d = x.shape[1]
    for name, model in (
        ("linear", torch.nn.Linear(d, len(SHAPES))),
        ("MLP", torch.nn.Sequential(torch.nn.Linear(d, 256), torch.nn.GELU(), torch.nn.Linear(256, len(SHAPES)))),
    ):
        small_acc, large_acc = probe_accuracy(model, x, y, small, fit)
        print(f"{name:6s} probe: shape of small objects {small_acc:.1%}, of large objects {large_acc:.1%}")


if __name__ == "__main__":
    main()
