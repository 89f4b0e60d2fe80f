"""models/training/encoder_data.py: the pairs of every step are a function of (seed, step, global sample index) and
the index only, so 1 process × batch 2 and 2 processes × batch 1 (or batch 1 × 2 accumulation steps) read exactly
the same global batches, and a loader started at step k continues an uninterrupted one exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_checkpoint import write_tiny_dataset

from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.training import encoder_data, face_shards
from comfyui_idfuse.models.training.encoder_data import (
    DataIdentity,
    PairLoader,
    PairPlan,
    ProcessShare,
    identities_of,
    split_held_out,
)

SHARDS = [[3, 2, 4], [2, 3], [3, 3, 2], [5]]
STEPS = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("pairs"), SHARDS, latent_size=4)


def plan_of(dataset, global_batch: int, seed: int = 5, held_out: int = 1) -> PairPlan:
    identities = identities_of(face_shards.read_index(dataset), dataset)
    training, _ = split_held_out(identities, held_out)
    return PairPlan(training, global_batch, seed, num_prompts=3)


def read(dataset, share: ProcessShare, start: int = 0, stop: int = STEPS, seed: int = 5) -> list:
    loader = PairLoader(dataset, plan_of(dataset, share.global_batch, seed), share)
    return list(loader(start, stop))


def global_batches(micro_batches_by_process: list[list]) -> dict[int, dict[str, torch.Tensor]]:
    """step -> the step's samples of every process, ordered by global sample index."""
    steps: dict[int, list] = {}
    for batches in micro_batches_by_process:
        for batch in batches:
            steps.setdefault(batch.step, []).append(batch)
    merged = {}
    for step, parts in steps.items():
        ids = torch.cat([p.sample_ids for p in parts])
        order = torch.argsort(ids)
        merged[step] = {name: torch.cat([getattr(p, name) for p in parts])[order]
                        for name in ("sample_ids", "reference_faces", "reference_clip", "target_latents", "prompts")}
    return merged


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step in a:
        for name in a[step]:
            assert torch.equal(a[step][name], b[step][name]), (step, name)


def test_one_process_batch_two_reads_what_two_processes_batch_one_read(dataset):
    one = global_batches([read(dataset, ProcessShare(0, 1, 2))])
    two = global_batches([read(dataset, ProcessShare(rank, 2, 1)) for rank in range(2)])
    accumulated = global_batches([read(dataset, ProcessShare(0, 1, 1, accumulation=2))])
    assert_same(one, two)
    assert_same(one, accumulated)
    assert list(one[0]["sample_ids"]) == [0, 1]


def test_each_process_gets_its_own_share(dataset):
    rank0, rank1 = (read(dataset, ProcessShare(rank, 2, 2), stop=2) for rank in range(2))
    assert [b.sample_ids.tolist() for b in rank0] == [[0, 1], [0, 1]]
    assert [b.sample_ids.tolist() for b in rank1] == [[2, 3], [2, 3]]
    assert not torch.equal(rank0[0].reference_faces, rank1[0].reference_faces)


def test_a_loader_started_at_a_step_continues_an_uninterrupted_one(dataset):
    share = ProcessShare(1, 2, 1)
    whole = global_batches([read(dataset, share)])
    resumed = global_batches([read(dataset, share, start=4)])
    assert_same({s: whole[s] for s in range(4, STEPS)}, resumed)


def test_the_seed_changes_the_pairs(dataset):
    share = ProcessShare(0, 1, 2)
    assert not torch.equal(read(dataset, share, seed=5)[0].reference_faces, read(dataset, share, seed=6)[0].reference_faces)


def test_pairs_are_two_different_photos_of_one_identity_and_every_identity_comes_once_per_epoch(dataset):
    plan = plan_of(dataset, global_batch=3)
    counts = {i.name: i.num_photos for i in plan.identities}
    epochs = 4
    steps = -(-epochs * len(plan) // 3)
    chosen = [plan.choice(step, g) for step in range(steps) for g in range(3)]
    for choice in chosen:
        assert choice.reference != choice.target
        assert 0 <= choice.reference < counts[choice.identity] and 0 <= choice.target < counts[choice.identity]
        assert 0 <= choice.prompt < 3
    for epoch in range(epochs):
        names = [c.identity for c in chosen[epoch * len(plan):(epoch + 1) * len(plan)]]
        assert Counter(names) == Counter({name: 1 for name in counts})
    # Shuffled: not the index's order, and another order in the next epoch.
    assert [c.identity for c in chosen[:len(plan)]] != [c.identity for c in chosen[len(plan):2 * len(plan)]]


def test_the_materialised_tensors_are_the_chosen_photos(dataset):
    (batch,) = read(dataset, ProcessShare(0, 1, 1), stop=1)
    (choice,) = batch.choices
    (sample,) = encoder_data.read_identities(dataset, [choice.identity])
    assert torch.equal(batch.reference_faces[0], sample.face_embeddings[choice.reference])
    assert torch.equal(batch.reference_clip[0], sample.clip_hidden[choice.reference])
    assert torch.equal(batch.target_latents[0], sample.latents[choice.target].float())
    assert batch.target_images is None


def test_a_process_keeps_only_the_two_photos_of_each_of_its_samples(dataset):
    share = ProcessShare(0, 2, 1)
    plan = plan_of(dataset, share.global_batch)
    stream = encoder_data._ShardStream(dataset, plan, share)
    stream.pair(0)
    start, end = stream._span
    mine = [p for p in range(start, end) if share.owns(p % plan.global_batch)]
    assert sorted([0, *stream._held]) == mine  # only this process's positions of the shard read
    for pair in stream._held.values():
        assert pair.reference_face.shape == (128,) and pair.reference_clip.shape == (257, 1280)
        assert pair.target_latents.shape == (4, 4, 4)


def test_held_out_identities_are_never_trained_on_and_do_not_depend_on_the_index_order():
    identities = [DataIdentity(f"p{i}", f"faces-{i % 3:06d}.tar", 2 + i % 3) for i in range(20)]
    training, held = split_held_out(identities, 3)
    training_reversed, held_reversed = split_held_out(identities[::-1], 3)
    assert {i.name for i in held} == {i.name for i in held_reversed} and len(held) == 3
    assert not {i.name for i in held} & {i.name for i in training}
    assert len(training) == 17 and {i.name for i in training} == {i.name for i in training_reversed}
    plan = PairPlan(training, 4, seed=0)
    assert not {plan.choice(s, g).identity for s in range(20) for g in range(4)} & {i.name for i in held}


def test_identities_with_one_photo_are_not_used():
    identities = [DataIdentity("a", "faces-000000.tar", 1), DataIdentity("b", "faces-000000.tar", 2)]
    training, _ = split_held_out(identities, 0)
    assert [i.name for i in training] == ["b"]
    with pytest.raises(IDFuseInputError, match="at least 2 usable photos"):
        PairPlan(split_held_out(identities[:1], 0)[0], 1, 0)


def test_a_dataset_without_latents_gives_the_target_crops(tmp_path):
    from tiny_checkpoint import synthetic_identity

    samples = [synthetic_identity(i, 3, latent_size=2) for i in range(2)]
    for sample in samples:
        sample.latents = None
        sample.images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    part = {"shard": face_shards.shard_name(0), "skipped_photos": [], "skipped_identities": [],
            "identities": [{"name": s.identity, "photos": 3} for s in samples]}
    part["sha256"] = face_shards.write_shard(tmp_path / part["shard"], samples)
    face_shards.write_part(tmp_path, 0, part)
    face_shards.merge_index(tmp_path, {"embedding_space": "dlib-resnet-128", "resolution": 16}, 1)
    (batch,) = read(tmp_path, ProcessShare(0, 1, 2), stop=1)
    assert batch.target_latents is None and batch.target_images.shape == (2, 16, 16, 3)
    by_name = {s.identity: s for s in samples}
    for row, choice in enumerate(batch.choices):
        assert torch.equal(batch.target_images[row], by_name[choice.identity].images[choice.target])


def test_a_missing_shard_is_a_clear_error(tmp_path):
    data = write_tiny_dataset(tmp_path / "faces", [[2, 2], [3, 2]], latent_size=2)
    (data / face_shards.shard_name(1)).unlink()
    with pytest.raises(IDFuseInputError, match="faces-000001.tar, which is missing"):
        read(data, ProcessShare(0, 1, 3), stop=2)


def test_a_loader_error_reaches_the_trainer(dataset, monkeypatch):
    def broken(path):
        raise RuntimeError(f"cannot read {path.name}")
        yield

    monkeypatch.setattr(encoder_data.face_shards, "iterate_shard", broken)
    with pytest.raises(RuntimeError, match="cannot read faces-"):
        read(dataset, ProcessShare(0, 1, 1), stop=1)
