"""Write evidence samples into webdataset shards, validating each with the reader's code."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import webdataset as wds

from megatron_ease.data.schema import MASK_EXTENSION, SampleError, decode_sample

logger = logging.getLogger(__name__)


def sample_members(
    record: Mapping[str, Any],
    images: Sequence[tuple[str, bytes]],
    masks: Optional[Mapping[int, bytes]] = None,
) -> dict[str, bytes]:
    """Tar members of one sample: {extension: bytes} (DESIGN §6 naming).

    images: (extension, encoded bytes) in image order, extension one of jpg|jpeg|png|webp.
    masks: image index -> PNG bytes.
    """
    files = {"json": json.dumps(record, ensure_ascii=False, allow_nan=True).encode("utf-8")}
    if len(images) == 1:
        files[images[0][0].lower()] = images[0][1]
    else:
        for i, (ext, data) in enumerate(images):
            files[f"{i}.{ext.lower()}"] = data
    for i, data in (masks or {}).items():
        files[MASK_EXTENSION if len(images) == 1 and i == 0 else f"{i}.{MASK_EXTENSION}"] = data
    return files


class EvidenceShardWriter:
    """Numbered shards ``{prefix}-000000.tar`` of ``samples_per_shard`` valid samples each.

    Every sample goes through ``decode_sample`` (the reader's validation) before it is written:
    invalid ones are counted by reason and logged, or raise under ``strict``. Shards are written
    under temporary names (``NAME.tar.tmp``) and renamed when the build closes, after which the
    earlier build's shards it ``overwrite``s are removed: a build that fails or is interrupted
    (a strict error, Ctrl-C) leaves the directory as it was, not a partial dataset that looks
    complete (or, with ``overwrite``, the old one gone). Until then the new build takes disk
    beside the old (and a glob such as ``dir/*`` also matches its ``.tmp`` files; ``*.tar``
    does not). Tar metadata is fixed (mtime 0), so equal inputs give equal bytes.
    """

    def __init__(self, out_dir: str, prefix: str = "shard", samples_per_shard: int = 1000, strict: bool = False,
                 overwrite: bool = False):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        # Shards of an earlier build under the same prefix: a build with fewer shards would
        # leave the old tail behind, and a glob over the directory would read its samples twice.
        # Exactly PREFIX-<digits>.tar: the glob alone also matched another prefix's shards
        # (train-[0-9]*.tar matches train-2024-000000.tar), which --overwrite then deleted.
        name = re.compile(re.escape(prefix) + r"-[0-9]+\.tar")
        old = sorted(path for path in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-[0-9]*.tar"))
                     if name.fullmatch(os.path.basename(path)))
        if old and not overwrite:
            raise FileExistsError(f"{out_dir} already holds {len(old)} shard(s) named {prefix}-*.tar "
                                  f"(e.g. {os.path.basename(old[0])}): choose another directory or "
                                  f"prefix, or overwrite them (build_shards.py --overwrite)")
        self._old = old  # removed when the new shards are published (close)
        self.out_dir, self.prefix, self.samples_per_shard, self.strict = out_dir, prefix, samples_per_shard, strict
        self.shards: list[str] = []
        self.num_written = 0
        self.skipped: Counter = Counter()
        self._keys: set[str] = set()
        self._tar: Optional[wds.TarWriter] = None
        self._tmp_path = ""
        self._done: list[tuple[str, str]] = []  # (temporary path, final path) of closed shards
        self._count = 0

    def write(self, key: str, files: Mapping[str, bytes]) -> bool:
        """Validate and append one sample. Returns False when it was skipped."""
        name = key.rsplit("/", 1)[-1]
        if "." in name:
            raise ValueError(f"sample key {key!r} contains a '.' (webdataset splits keys at the first dot)")
        if not name or name.startswith("__"):
            # The reader (like webdataset's __key__ / __index__) takes such names for metadata
            # and would drop the sample without counting it.
            raise ValueError(f"sample key {key!r} is empty or starts with '__' (reserved for "
                             f"webdataset metadata; the reader would skip the sample)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        shard_name = self._shard_path(len(self.shards) - (0 if self._tar is None else 1))
        try:
            decode_sample(files, key, shard_name)
        except SampleError as e:
            if self.strict:
                raise
            self.skipped[e.reason] += 1
            logger.warning("skipping %s", e)
            return False
        if self._tar is None:
            self._open_next()
        self._tar.write({"__key__": key, **files})
        self._keys.add(key)
        self._count += 1
        self.num_written += 1
        if self._count == self.samples_per_shard:
            self._close_current()
        return True

    def close(self) -> dict[str, Any]:
        """Finish the last shard and publish the build (rename every shard to its name, then
        remove the earlier build's others); returns the summary {shards, written, skipped}."""
        self._close_current()
        for tmp, final in self._done:
            os.replace(tmp, final)
        new = {final for _, final in self._done}
        for path in self._old:
            if path not in new:
                os.remove(path)
        self._done, self._old = [], []
        return {"shards": list(self.shards), "written": self.num_written, "skipped": dict(self.skipped)}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # nothing is published: the directory stays as it was
            if self._tar is not None:
                self._tar.close()
                os.remove(self._tmp_path)
                self._tar = None
            for tmp, _ in self._done:
                os.remove(tmp)
            self._done = []

    def _shard_path(self, index: int) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{index:06d}.tar")

    def _open_next(self):
        path = self._shard_path(len(self.shards))
        self.shards.append(path)
        self._tmp_path = path + ".tmp"
        self._tar = wds.TarWriter(self._tmp_path, encoder=False, mtime=0.0)
        self._count = 0

    def _close_current(self):
        if self._tar is None:
            return
        self._tar.close()
        self._done.append((self._tmp_path, self.shards[-1]))
        self._tar = None
