"""The pairs the ID encoder trains on: which identity and which two photos make each sample of each step,
and this process's share of them, read from the prepared shards (``face_shards``). Plain torch + numpy.

**Every choice is a function of (seed, step, global sample index) and the dataset index**, nothing else: a
run's global batches do not depend on the number of processes (1 process × batch 2 trains on exactly what
2 processes × batch 1 train on), and a resumed run continues exactly where it stopped, its data position
being its step.

- *Order.* The training identities form a stream, epoch after epoch. In epoch ``e`` the shards come in a
  seeded order and, within each shard, its identities in a seeded order (shuffling at shard level, so a
  process reads the shards one after the other: streaming, no random access into a tar file). Global
  sample ``g`` of step ``s`` is stream position ``s * G + g``, ``G`` the global batch (batch per process ×
  processes × accumulation steps). An identity comes back only in the next epoch.
- *Pair.* Reference and target photo: two different photos of the identity, drawn with a generator seeded
  by (seed, step, g); so is the prompt (when several are given).
- *Split.* Global sample ``g`` of a step belongs to accumulation micro-batch ``g // (P * B)`` and, in it, to
  process ``(g % (P * B)) // B`` (``P`` processes, ``B`` batch per process): each process materialises only
  its share.
- *Cost.* The whole order is computed from the index alone: for each training identity its name, shard and
  number of photos (about 100 bytes each: ~1 MB for 10k identities), plus one epoch's order (an int array,
  80 kB for 10k). Each process reads every shard once per epoch (and decodes it: the reader decodes whole
  samples) but keeps only the two photos of each of its upcoming samples from the shard being read, so memory
  holds (identities per shard / processes) pairs plus the prefetched micro-batches.
- *Held-out identities* (validation): the ``k`` identities whose names have the smallest SHA-1, so the choice
  does not depend on the seed, the shard layout or the order of the index; they are never trained on.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import IDFuseInputError, TrainingError
from . import face_shards

log = logging.getLogger("idfuse.training")

# Salts keep the stream order, the pair choice and other seeded draws (noise, timesteps) independent.
ORDER_SALT = 0x1D0F
PAIR_SALT = 0x9A12
PREFETCH_MICRO_BATCHES = 4


@dataclass(frozen=True)
class DataIdentity:
    """What the index says about one identity: enough to plan every pair without reading a shard."""

    name: str
    shard: str  # the shard's file name
    num_photos: int


@dataclass(frozen=True)
class PairChoice:
    """Global sample ``sample_id`` of ``step``: the identity and its reference / target photos."""

    step: int
    sample_id: int
    identity: str
    reference: int
    target: int
    prompt: int


@dataclass
class PairSamples:
    """One micro-batch of this process, as read from the shards (what ``PairBatch`` is built from)."""

    step: int
    micro: int
    choices: list[PairChoice]
    sample_ids: torch.Tensor  # int64 [B]
    reference_faces: torch.Tensor  # float32 [B, D]
    reference_clip: torch.Tensor | None  # [B, 257, 1280] or None when the dataset has no CLIP features
    target_latents: torch.Tensor | None  # [B, C, h, w] when the dataset has latents
    target_images: torch.Tensor | None  # uint8 [B, H, W, 3] when it has no latents (the trainer VAE-encodes them)
    prompts: torch.Tensor  # int64 [B]: index of each sample's prompt


def identities_of(index: dict, dataset_dir: str | Path) -> list[DataIdentity]:
    """The identities the index lists (name, shard, number of photos)."""
    entries = index.get("identities")
    if not isinstance(entries, list):
        raise IDFuseInputError(f"--data {dataset_dir}: its index.json lists no identities; prepare the dataset with "
                               f"scripts/prepare_faces.py.")
    identities = []
    for entry in entries:
        name = entry.get("name", entry.get("identity"))
        photos = entry.get("num_photos", entry.get("photos"))
        photos = len(photos) if isinstance(photos, list) else int(photos)
        identities.append(DataIdentity(str(name), Path(str(entry["shard"])).name, photos))
    return identities


def _name_hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def split_held_out(identities: Sequence[DataIdentity], count: int) -> tuple[list[DataIdentity], list[DataIdentity]]:
    """(training identities, the ``count`` held-out ones): those whose names have the smallest SHA-1."""
    usable = [i for i in identities if i.num_photos >= 2]
    held = set(sorted((i.name for i in usable), key=_name_hash)[:count]) if count > 0 else set()
    return [i for i in usable if i.name not in held], [i for i in usable if i.name in held]


class PairPlan:
    """Which identity and photos every global sample of every step is, from the index alone (see the module doc)."""

    def __init__(self, identities: Sequence[DataIdentity], global_batch: int, seed: int, num_prompts: int = 1):
        if not identities:
            raise IDFuseInputError("--data: no identity with at least 2 usable photos is left for training (a pair "
                                   "needs a reference and a different target photo); add photos or hold out fewer "
                                   "identities (--validation-identities).")
        if global_batch < 1:
            raise IDFuseInputError(f"The global batch must be at least 1, got {global_batch}.")
        self.identities = list(identities)
        self.global_batch, self.seed, self.num_prompts = global_batch, seed, max(1, num_prompts)
        self.shards = sorted({i.shard for i in self.identities})
        self._by_shard = {s: [n for n, i in enumerate(self.identities) if i.shard == s] for s in self.shards}
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.identities)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The identity indices of epoch ``epoch``, shard after shard (both orders seeded)."""
        order = self._epochs.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, ORDER_SALT, epoch])
            parts = []
            for shard in (self.shards[k] for k in rng.permutation(len(self.shards))):
                members = np.asarray(self._by_shard[shard], dtype=np.int64)
                parts.append(members[rng.permutation(len(members))])
            order = np.concatenate(parts)
            self._epochs = {e: o for e, o in self._epochs.items() if e >= epoch - 1}  # keep the current two
            self._epochs[epoch] = order
        return order

    def identity_at(self, position: int) -> DataIdentity:
        epoch, offset = divmod(position, len(self.identities))
        return self.identities[int(self.epoch_order(epoch)[offset])]

    def choice(self, step: int, sample_id: int) -> PairChoice:
        identity = self.identity_at(step * self.global_batch + sample_id)
        rng = np.random.default_rng([self.seed, PAIR_SALT, step, sample_id])
        reference = int(rng.integers(identity.num_photos))
        target = (reference + 1 + int(rng.integers(identity.num_photos - 1))) % identity.num_photos
        prompt = int(rng.integers(self.num_prompts))
        return PairChoice(step, sample_id, identity.name, reference, target, prompt)


@dataclass(frozen=True)
class ProcessShare:
    """Which global samples of a step this process handles: ``batch_size`` per micro-batch, ``accumulation``
    micro-batches, ``world_size`` processes."""

    rank: int
    world_size: int
    batch_size: int
    accumulation: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def sample_ids(self, micro: int) -> list[int]:
        first = micro * self.world_size * self.batch_size + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def owns(self, sample_id: int) -> bool:
        return (sample_id % (self.world_size * self.batch_size)) // self.batch_size == self.rank


@dataclass
class _Pair:
    """What one sample keeps of its identity: the two photos it uses (an identity may have hundreds)."""

    reference_face: torch.Tensor
    reference_clip: torch.Tensor | None
    target_latents: torch.Tensor | None
    target_image: torch.Tensor | None


def _pair_of(sample: face_shards.IdentitySample, choice: PairChoice) -> _Pair:
    ref, target = choice.reference, choice.target
    if max(ref, target) >= len(sample):
        raise IDFuseInputError(f"Identity {sample.identity}: the index says it has more photos than its shard holds "
                               f"({len(sample)}); prepare the dataset again.")
    return _Pair(
        reference_face=sample.face_embeddings[ref].float().clone(),
        reference_clip=None if sample.clip_hidden is None else sample.clip_hidden[ref].clone(),
        target_latents=None if sample.latents is None else sample.latents[target].float().clone(),
        target_image=None if sample.images is None else sample.images[target].clone())


class _ShardStream:
    """The pairs this process needs, read shard after shard in the plan's order: of the shard being read it keeps
    only the two photos of each upcoming sample of this process, and drops each pair once used. Memory: about
    (identities per shard / processes) x 2 photos' features (~1.4 MB a pair with CLIP features)."""

    def __init__(self, dataset_dir: Path, plan: PairPlan, share: ProcessShare):
        self.dataset_dir, self.plan, self.share = dataset_dir, plan, share
        self.paths = {p.name: p for p in face_shards.shard_paths(dataset_dir)}
        self._span: tuple[int, int] = (0, 0)  # stream positions [start, end) of the shard held
        self._held: dict[int, _Pair] = {}  # stream position -> its pair

    def _span_of(self, position: int) -> tuple[int, int]:
        """Stream positions of the shard (in its epoch) that holds ``position``."""
        count = len(self.plan)
        epoch, offset = divmod(position, count)
        order = self.plan.epoch_order(epoch)
        shard = self.plan.identities[int(order[offset])].shard
        start = offset
        while start > 0 and self.plan.identities[int(order[start - 1])].shard == shard:
            start -= 1
        end = offset + 1
        while end < count and self.plan.identities[int(order[end])].shard == shard:
            end += 1
        return epoch * count + start, epoch * count + end

    def _load(self, position: int) -> None:
        start, end = self._span_of(position)
        batch = self.plan.global_batch
        # Within one shard's span of an epoch each identity comes once: name -> (position, choice).
        needed = {}
        for p in range(max(start, position), end):
            if self.share.owns(p % batch):
                choice = self.plan.choice(p // batch, p % batch)
                needed[choice.identity] = (p, choice)
        shard = self.plan.identity_at(position).shard
        path = self.paths.get(shard)
        if path is None:
            raise IDFuseInputError(f"--data {self.dataset_dir}: index.json lists shard {shard}, which is missing; "
                                   f"finish preparing the dataset (scripts/prepare_faces.py resumes).")
        held = {}
        for sample in face_shards.iterate_shard(path):
            if sample.identity in needed:
                p, choice = needed[sample.identity]
                held[p] = _pair_of(sample, choice)
        missing = sorted(name for name, (p, _) in needed.items() if p not in held)
        if missing:
            raise IDFuseInputError(f"--data {self.dataset_dir}: shard {shard} lacks identities its index lists "
                                   f"({missing[:3]}); prepare the dataset again.")
        self._held, self._span = held, (start, end)
        log.debug("read shard %s: %d of its samples for this process", shard, len(needed))

    def pair(self, position: int) -> _Pair:
        if not self._span[0] <= position < self._span[1]:
            self._load(position)
        return self._held.pop(position)


def _stacked(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.stack(tensors)


class PairLoader:
    """This process's micro-batches from ``start_step`` on, read ahead in a background thread."""

    def __init__(self, dataset_dir: str | Path, plan: PairPlan, share: ProcessShare,
                 prefetch: int = PREFETCH_MICRO_BATCHES):
        if share.global_batch != plan.global_batch:
            raise TrainingError(f"the process share makes global batches of {share.global_batch}, the plan "
                             f"{plan.global_batch}")
        self.dataset_dir, self.plan, self.share, self.prefetch = Path(dataset_dir), plan, share, prefetch

    def micro_batch(self, stream: _ShardStream, step: int, micro: int) -> PairSamples:
        choices = [self.plan.choice(step, g) for g in self.share.sample_ids(micro)]
        pairs = [stream.pair(step * self.plan.global_batch + c.sample_id) for c in choices]
        has_latents = all(p.target_latents is not None for p in pairs)
        return PairSamples(
            step=step, micro=micro, choices=choices,
            sample_ids=torch.tensor([c.sample_id for c in choices], dtype=torch.int64),
            reference_faces=torch.stack([p.reference_face for p in pairs]),
            reference_clip=_stacked([p.reference_clip for p in pairs]),
            target_latents=torch.stack([p.target_latents for p in pairs]) if has_latents else None,
            target_images=None if has_latents else _stacked([p.target_image for p in pairs]),
            prompts=torch.tensor([c.prompt for c in choices], dtype=torch.int64),
        )

    def iterate(self, start_step: int, stop_step: int) -> Iterator[PairSamples]:
        """Micro-batches of steps [start_step, stop_step), in order (accumulation micro-batches within a step)."""
        stream = _ShardStream(self.dataset_dir, self.plan, self.share)
        for step in range(start_step, stop_step):
            for micro in range(self.share.accumulation):
                yield self.micro_batch(stream, step, micro)

    def __call__(self, start_step: int, stop_step: int) -> Iterator[PairSamples]:
        """:meth:`iterate` read ahead by a daemon thread; an error there is raised here."""
        return _prefetched(self.iterate(start_step, stop_step), self.prefetch)


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            buffer.put(e)

    worker = threading.Thread(target=produce, name="idfuse-pair-loader", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def read_identities(dataset_dir: str | Path, names: Sequence[str]) -> list[face_shards.IdentitySample]:
    """The samples of the named identities (e.g. the held-out ones), in the order given; reads only their shards."""
    wanted = set(names)
    shards = {i.shard for i in identities_of(face_shards.read_index(dataset_dir), dataset_dir) if i.name in wanted}
    found = {}
    for path in face_shards.shard_paths(dataset_dir):
        if path.name in shards:
            found.update({s.identity: s for s in face_shards.iterate_shard(path) if s.identity in wanted})
    missing = [n for n in names if n not in found]
    if missing:
        raise IDFuseInputError(f"--data {dataset_dir}: no shard holds the identities {missing[:3]}; prepare the "
                               f"dataset again.")
    return [found[n] for n in names]
