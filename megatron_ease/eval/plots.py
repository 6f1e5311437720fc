"""Pictures of evaluation results: the attention overlays of ``Evaluator`` samples.

``plot_attention_overlays`` draws, per held-out sample, the image, its evidence target and each
model's response→image attention over it, every panel on one colour scale (shares of the panel's
mass per visual token), titled with the attention's share inside the evidence.
"""

from __future__ import annotations

import os


def sample_images(shard: str, key: str) -> list:
    """The sample's images, read back from its shard (for the overlays) as the reader decoded
    them: the same members (``KEY.jpg`` or ``KEY.<i>.<ext>``, never a mask), upright (EXIF
    orientation applied, the frame of their visual tokens and boxes) and in RGB as the
    processor converts them."""
    import tarfile

    from megatron_ease.data.image import to_rgb
    from megatron_ease.data.schema import (
        IMAGE_EXTENSIONS,
        SampleError,
        decode_sample,
        split_member_name,
    )

    with tarfile.open(shard) as tar:
        members = {}
        for member in tar.getmembers():
            name_key, ext = split_member_name(member.name)
            if name_key == key and member.isfile():
                members[ext] = member
        # Images and the JSON only (masks and other members are not needed to show it).
        files = {ext: tar.extractfile(m).read() for ext, m in members.items()
                 if ext == "json" or ext.rpartition(".")[2] in IMAGE_EXTENSIONS}
    try:
        return [to_rgb(image) for image in decode_sample(files, key, shard).images]
    except SampleError as e:
        raise ValueError(f"overlay: cannot read back the image of sample {key!r} of {shard}: "
                         f"{e}") from None


def evidence_share(attention, evidence) -> float:
    """The share of an attention grid's mass on the evidence tokens (a bool grid, E > 0): the
    training metric ``attn_in_evidence`` for one sample."""
    import numpy as np

    attention = np.asarray(attention, dtype=float)
    total = attention.sum()
    return float(attention[np.asarray(evidence, dtype=bool)].sum() / total) if total > 0 else 0.0


def plot_attention_overlays(overlays: dict[str, list[dict]], out_dir: str,
                            prefix: str = "attention") -> list[str]:
    """``overlays``: per model name, ``attention_maps`` of the same samples. Writes
    ``out_dir/<prefix>_<i>.png`` per sample, a row per image of it; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    names = list(overlays)
    written = []
    for i, sample in enumerate(overlays[names[0]]):
        per_image = sample.get("images") or [sample]  # maps written before "images" existed
        images = [np.asarray(image) for image in
                  sample_images(sample["shard"], sample["key"])[:len(per_image)]]
        columns = 2 + len(names)
        fig, axes = plt.subplots(len(images), columns, squeeze=False, layout="constrained",
                                 figsize=(3.2 * columns + 0.8, 3.6 * len(images)))
        # Each panel's grids as shares of its own mass over all of the sample's images, on one
        # colour scale from 0 for the whole sample: scaled to its own min/max, a near-uniform
        # attention would look as sharp as the target, and per image, an image holding little
        # of the attention would look as attended as the others.
        evidence = [np.array(m["evidence"], dtype=bool) for m in per_image]
        panels = [("evidence target", [np.array(m["target"], dtype=float) for m in per_image])]
        for name in names:
            maps = overlays[name][i].get("images") or [overlays[name][i]]
            attention = [np.array(m["attention"], dtype=float) for m in maps]
            share = evidence_share(np.concatenate([a.ravel() for a in attention]),
                                   np.concatenate([e.ravel() for e in evidence]))
            panels.append((f"{name}: response→image attention\nin evidence: {share:.3f}",
                           attention))
        grids = []
        for _, grid_list in panels:
            total = sum(float(g.sum()) for g in grid_list)
            grids.append([g / total if total > 0 else g for g in grid_list])
        vmax = max([float(g.max()) for grid_list in grids for g in grid_list if g.size] + [0.0]) \
            or 1.0
        for row, image in enumerate(images):
            extent = (0, image.shape[1], image.shape[0], 0)
            axes[row, 0].imshow(image)
            axes[row, 0].set_title("image" if len(images) == 1 else f"image {row}", fontsize=9)
            for ax, (title, _), grid_list in zip(axes[row, 1:], panels, grids):
                ax.imshow(image, extent=extent)
                shown = ax.imshow(grid_list[row], cmap="magma", alpha=0.6, vmin=0.0, vmax=vmax,
                                  extent=extent, interpolation="nearest")
                if row == 0:
                    ax.set_title(title, fontsize=9)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(shown, ax=list(axes[:, 1:].flat), shrink=0.85,
                     label="share of the panel's mass per visual token")
        fig.suptitle(f"{sample['question']}  (answer: {sample['answer']})", fontsize=9)
        path = os.path.join(out_dir, f"{prefix}_{i}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
