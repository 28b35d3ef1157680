"""Training batches from a binary-mask folder (`teachers.mask_folders`): a fixed order, resumable
exactly.

The order is a pure function of the seed: epoch `e` visits the train pairs in the permutation
`default_rng([seed, e])`, and global step `t` takes samples `t B .. (t + 1) B - 1` of that endless
sequence (B the global batch). Micro-batch slot `s = rank * accum + micro` of the step takes
`m = B / (processes x accum)` consecutive samples from `t B + s m`, so one process accumulating two
micro-batches and two processes with one each see the same samples, and a stream's position is
one integer: the micro-batches this process has drawn. Loader workers prefetch in order (a batch
sampler), so nothing is consumed that the position does not count.

A pair whose pixels turn out bad (unreadable, a mask of another size, non-binary, empty) is
replaced by the next pair of the dataset that loads, deterministically, and named in the batch
(`bad`); under --on-bad stop it raises its named `MaskDataError` instead. Pairs the file names
already rule out (an image without a mask, ...) are counted before training by `list_pairs`.

Each sample: the image as SAM preprocesses it ([3, S, S]), the mask resized the same way
(bilinear, > 0.5) and zero-padded ([1, S, S]), the valid (unpadded) region ([1, S, S]) and the box
prompt in the resized frame ([4]).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from itertools import count

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset

from teachers.mask_folders import MaskDataError, MaskPair, load_pair, prompt_box
from teachers.preprocess import preprocess
from teachers.runtime.preempt import ignore_in_worker, stop_workers


def training_sample(image: np.ndarray, mask: np.ndarray, img_size: int, prompt: str) -> dict:
    """Tensors of one image/mask pair in the model's input frame (see the module doc)."""
    pre = preprocess(image, img_size)
    h, w = pre.input_hw
    resized = F.interpolate(
        torch.from_numpy(mask).float()[None, None], size=(h, w), mode="bilinear"
    )[0]
    pad = (0, img_size - w, 0, img_size - h)
    box = ResizeLongestSide(img_size).apply_boxes(
        np.asarray([prompt_box(mask, prompt)]), mask.shape
    )
    return {
        "image": pre.image,
        "target": F.pad((resized > 0.5).float(), pad),
        "valid": F.pad(torch.ones(1, h, w), pad),
        "box": torch.as_tensor(box[0], dtype=torch.float32),
    }


class MaskTrainSet(Dataset):
    """`training_sample`s of a list of pairs; a bad pair is replaced by the next good one."""

    def __init__(self, pairs: list[MaskPair], img_size: int, prompt: str, on_bad: str) -> None:
        if not pairs:
            raise ValueError("no training pair left: the train split has no usable image/mask pair")
        self.pairs, self.img_size, self.prompt, self.on_bad = pairs, img_size, prompt, on_bad

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        bad = []
        for offset in range(len(self.pairs)):
            pair = self.pairs[(index + offset) % len(self.pairs)]
            try:
                image, mask = load_pair(pair)
            except MaskDataError as err:
                if self.on_bad == "stop":
                    raise
                bad.append(str(err))
                continue
            sample = training_sample(image, mask, self.img_size, self.prompt)
            return sample | {"bad": bad}
        raise ValueError(f"none of the {len(self.pairs)} training pairs loads: {bad[0]}")


def collate(samples: list[dict]) -> dict:
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "bad"}
    return batch | {"bad": [b for s in samples for b in s["bad"]]}


class SampleOrder:
    """Dataset indices of this process's micro-batches, from its `start`-th draw on (endless)."""

    def __init__(self, num: int, batch: int, micro: int, rank: int, accum: int, seed: int) -> None:
        self.num, self.batch, self.micro = num, batch, micro
        self.rank, self.accum, self.seed, self.start = rank, accum, seed, 0

    @lru_cache(maxsize=4)  # noqa: B019 (a handful of epochs, one order per run)
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num)

    def first_sample(self, draw: int) -> int:
        """Global index (in the endless sequence) of the first sample of draw `draw`."""
        step, micro = divmod(draw, self.accum)
        return step * self.batch + (self.rank * self.accum + micro) * self.micro

    def indices(self, draw: int) -> list[int]:
        first = self.first_sample(draw)
        return [
            int(self._epoch(g // self.num)[g % self.num]) for g in range(first, first + self.micro)
        ]

    def __iter__(self):
        return (self.indices(draw) for draw in count(self.start))


def fingerprint(pairs: list[MaskPair]) -> str:
    """Names and sizes of the training files: a resumed run must read the same data."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in (pair.image, pair.mask):
            digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


class MaskBatches:
    """This process's micro-batches, in order, with the state a checkpoint needs.

    `job_state()` is the position (micro-batches drawn), the batch layout and the data's
    fingerprint, `rank_state()` the bad pairs this process met; `restore` continues from them. Each batch carries `noise_seed`, a seed that
    depends only on the micro-batch's place in the run, for methods that draw noise (Conv-LoRA's
    gate), so their noise, too, is the same on resume and for any number of processes.
    """

    def __init__(
        self, dataset: MaskTrainSet, order: SampleOrder, world: int, workers: int, extra: dict
    ) -> None:
        """`extra`: the job's own facts, saved with the position (e.g. the base's sha256)."""
        self.dataset, self.order, self.world, self.workers = dataset, order, world, workers
        self.extra = extra
        self.data_id = fingerprint(dataset.pairs)
        self.drawn, self.bad = 0, set()
        self._iter = None

    def restore(self, job: dict | None, mine: dict | None, steps_done: int) -> None:
        """Continue from `job` and `mine` (a checkpoint's job and rank state); None: fresh."""
        if job is None:
            return
        if job["data"] != self.data_id:
            raise ValueError(
                "the training data changed since the checkpoint (file names or sizes differ): "
                "resume with the data it was trained on, or start a new --out"
            )
        self.bad = set((mine or {}).get("bad", []))
        if [job["world"], job["accum"]] == [self.world, self.order.accum]:
            self.drawn = job["drawn"]
        elif job["drawn"] == steps_done * job["accum"]:
            self.drawn = steps_done * self.order.accum  # another layout, same global batches
        else:
            raise ValueError(
                f"the checkpoint skipped non-finite micro-batches with {job['world']} processes x "
                f"{job['accum']} micro-batches: resume with that layout"
            )

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self.order.start = self.drawn
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.order,
                num_workers=self.workers,
                collate_fn=collate,
                worker_init_fn=ignore_in_worker,
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.bad.update(batch.pop("bad"))
        batch["noise_seed"] = self.order.seed * 1_000_003 + self.order.first_sample(self.drawn)
        self.drawn += 1
        return batch

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def job_state(self) -> dict:
        return {
            "drawn": self.drawn,
            "world": self.world,
            "accum": self.order.accum,
            "data": self.data_id,
        } | self.extra

    def rank_state(self) -> dict:
        return {"bad": sorted(self.bad)}

    def close(self) -> None:
        if self._iter is not None:
            stop_workers(self._iter)
