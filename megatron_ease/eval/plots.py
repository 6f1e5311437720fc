"""Pictures of evaluation results: the attention overlays of ``Evaluator`` samples.

``plot_attention_overlays`` draws, per held-out sample, the image, its evidence target and each
model's response→image attention over it, every panel on one colour scale (shares of the panel's
mass per visual token), titled with the attention's share inside the evidence.
"""

from __future__ import annotations

import os


def first_image(shard: str, key: str):
    """The sample's first image, read back from its shard (for the overlays) as the reader
    decoded it: the same member (``KEY.jpg`` or ``KEY.0.<ext>``, never a mask), upright (EXIF
    orientation applied, the frame of its visual tokens and boxes) and in RGB as the processor
    converts it."""
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
        return to_rgb(decode_sample(files, key, shard).images[0])
    except SampleError as e:
        raise ValueError(f"overlay: cannot read back the image of sample {key!r} of {shard}: "
                         f"{e}") from None


def normalised(grid):
    """A grid as shares of its total (unchanged when it sums to 0)."""
    import numpy as np

    grid = np.asarray(grid, dtype=float)
    total = grid.sum()
    return grid / total if total > 0 else grid


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
    ``out_dir/<prefix>_<i>.png`` per sample; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    names = list(overlays)
    written = []
    for i, sample in enumerate(overlays[names[0]]):
        image = np.asarray(first_image(sample["shard"], sample["key"]))
        extent = (0, image.shape[1], image.shape[0], 0)
        fig, axes = plt.subplots(1, 2 + len(names), figsize=(3.2 * (2 + len(names)) + 0.8, 3.6),
                                 layout="constrained")
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=9)
        target = np.array(sample["target"], dtype=float)
        evidence = np.array(sample["evidence"], dtype=bool)
        panels = [("evidence target", target)]
        for name in names:
            attention = np.array(overlays[name][i]["attention"], dtype=float)
            panels.append((f"{name}: response→image attention\n"
                           f"in evidence: {evidence_share(attention, evidence):.3f}", attention))
        # Each panel as shares of its own mass, on one colour scale from 0 for the whole sample:
        # scaled to its own min/max, a near-uniform attention would look as sharp as the target.
        grids = [normalised(grid) for _, grid in panels]
        vmax = max([float(grid.max()) for grid in grids if grid.size] + [0.0]) or 1.0
        for ax, (title, _), grid in zip(axes[1:], panels, grids):
            ax.imshow(image, extent=extent)
            shown = ax.imshow(grid, cmap="magma", alpha=0.6, vmin=0.0, vmax=vmax,
                              extent=extent, interpolation="nearest")
            ax.set_title(title, fontsize=9)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(shown, ax=list(axes[1:]), shrink=0.85,
                     label="share of the panel's mass per visual token")
        fig.suptitle(f"{sample['question']}  (answer: {sample['answer']})", fontsize=9)
        path = os.path.join(out_dir, f"{prefix}_{i}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
