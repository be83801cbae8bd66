"""Stage-1 shards: determinism, exact resume, rank/worker split, mixing, and bad data skipped with its key."""

from __future__ import annotations

import json
import random
import tarfile
import tracemalloc
from collections import Counter

import pytest
import torch

from minigpt4.data import SkippedSample, summarize_skips
from minigpt4.data.webdataset import expand_shards, read_tar_groups, sample_caption, stage1_batches
from minigpt4.processing.image import train_transform

from .conftest import (
    encode,
    good_sample,
    hang_guard,
    make_dataset,
    photo,
    positions_before,
    same_batches,
    synthetic,
    take,
    write_shard,
)


@pytest.fixture
def two_datasets(tmp_path):
    big = make_dataset(tmp_path / "laion", "laion", shards=4, per_shard=6)
    small = make_dataset(tmp_path / "ccsbu", "ccsbu", shards=2, per_shard=5)
    return [(big, 115.0), (small, 14.0)]


def test_batches_hold_processed_captions_and_images(tmp_path, transform):
    pattern = make_dataset(tmp_path, "d", shards=1, per_shard=4)
    batch = next(stage1_batches([(pattern, 1.0)], transform, 4, seed=0))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert sorted(batch["key"]) == [f"d-00-{i:03d}" for i in range(4)]
    # blip_caption: lower-cased, ". : !" removed, as the original's stage-1 text processor.
    assert all(text == f"picture {key} a test image" for text, key in zip(batch["text"], batch["key"]))
    assert batch["skipped"] == [] and batch["dataset"] == pattern
    raw = next(stage1_batches([(pattern, 1.0)], transform, 1, seed=0, process_captions=False))
    assert raw["text"][0] == f"Picture {raw['key'][0]}: a Test Image."


def test_same_seed_same_stream_and_other_seed_other_order(two_datasets):
    augment = train_transform(8)
    first = take(stage1_batches(two_datasets, augment, 3, seed=7, shuffle_buffer=8), 6)
    again = take(stage1_batches(two_datasets, augment, 3, seed=7, shuffle_buffer=8), 6)
    other = take(stage1_batches(two_datasets, augment, 3, seed=8, shuffle_buffer=8), 6)
    assert same_batches(first, again)  # random crops included: they are seeded per sample
    assert [b["key"] for b in first] != [b["key"] for b in other]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_yields_exactly_the_tail_of_the_full_run(two_datasets, num_workers):
    augment = train_transform(8)
    options = dict(seed=3, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=5)
    full = take(stage1_batches(two_datasets, augment, 2, **options), 12)
    resumed = take(stage1_batches(two_datasets, augment, 2, start_batch=7, positions=positions_before(full[:7]),
                                  **options), 5)
    assert same_batches(full[7:], resumed)
    assert {b["dataset"] for b in full} == {spec for spec, _ in two_datasets}  # both datasets took part


def test_augmentation_leaves_the_callers_rng_alone(tmp_path):
    pattern = make_dataset(tmp_path, "d", shards=1, per_shard=3)
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_python = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(123)
    next(stage1_batches([(pattern, 1.0)], train_transform(8), 3, seed=0))
    assert torch.equal(torch.rand(1), expected_torch) and random.random() == expected_python


@pytest.mark.parametrize("shards,per_shard", [(8, 5), (2, 20)])  # whole shards per reader / samples dealt out
def test_two_ranks_two_workers_cover_each_sample_once_per_pass(tmp_path, transform, shards, per_shard):
    pattern = make_dataset(tmp_path, "d", shards=shards, per_shard=per_shard)
    total = shards * per_shard  # 40: 4 readers x 10 samples, 2 batches of 5 each
    keys: list[str] = []
    for rank in range(2):
        stream = stage1_batches([(pattern, 1.0)], transform, 5, seed=11, rank=rank, world_size=2, num_workers=2)
        keys += [key for batch in take(stream, total // 5 // 2) for key in batch["key"]]
    assert len(keys) == total and len(set(keys)) == total  # no duplicates, full coverage


def test_mixing_ratio_is_respected(tmp_path, transform):
    big = make_dataset(tmp_path / "a", "a", shards=1, per_shard=4)
    small = make_dataset(tmp_path / "b", "b", shards=1, per_shard=4)
    batches = take(stage1_batches([(big, 3.0), (small, 1.0)], transform, 1, seed=0, shuffle_buffer=0), 400)
    counts = Counter(batch["key"][0][0] for batch in batches)
    assert 0.68 < counts["a"] / 400 < 0.82, counts  # expected 0.75; each batch comes whole from one dataset


def test_bad_samples_and_truncated_tar_are_skipped_and_reported(tmp_path, transform, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", [
        good_sample("ok-0", 0),
        {"__key__": "corrupt", "jpg": b"\xff\xd8 not really a jpeg", "json": json.dumps({"caption": "a cat"})},
        {"__key__": "empty", "jpg": encode(synthetic(1)), "json": json.dumps({"caption": " ... "}), "txt": ""},
        {"__key__": "nocaption", "jpg": encode(synthetic(2))},
        {"__key__": "noimage", "txt": "a caption without its image"},
        {"__key__": "png-txt-only", "png": encode(photo("coffee"), "PNG"), "txt": "A cup of coffee"},
        good_sample("ok-1", 1),
    ])
    write_shard(folder / "00001.tar", [good_sample(f"t-{i}", i + 2) for i in range(4)])
    data = (folder / "00001.tar").read_bytes()
    cut = data.index(b"t-2.jpg") + 700  # inside the third sample's image: the rest of the shard is lost
    (folder / "00001.tar").write_bytes(data[:cut])
    pattern = f"{folder}/{{00000..00002}}.tar"  # 00002.tar does not exist (an img2dataset gap)

    stream = stage1_batches([(pattern, 1.0)], transform, 1, seed=0, shuffle_buffer=0)
    batches = take(stream, 6)  # one pass (ok-0, png-txt-only, ok-1, t-0, t-1) and one sample of the next
    assert sorted(key for b in batches[:5] for key in b["key"]) == ["ok-0", "ok-1", "png-txt-only", "t-0", "t-1"]
    assert next(b for b in batches if b["key"] == ["png-txt-only"])["text"] == ["a cup of coffee"]  # .txt fallback
    # A problem is reported with the first batch after it; the 6th batch carries the end of the first pass.
    skipped = list(dict.fromkeys(skip for b in batches for skip in b["skipped"]))
    reasons = {(s.source.rsplit("/", 1)[-1], s.key): s.reason.split(":")[0] for s in skipped}
    assert reasons == {
        ("00000.tar", "corrupt"): "corrupt image",
        ("00000.tar", "empty"): "empty caption",
        ("00000.tar", "nocaption"): "no caption",
        ("00000.tar", "noimage"): "no image",
        ("00001.tar", "t-2"): "truncated tar",
        ("00002.tar", ""): "missing shard",
    }
    assert "skipped 6 samples" in summarize_skips(skipped)
    assert "00000.tar [corrupt]: corrupt image" in caplog.text  # logged with shard and key
    assert next(stream)["image"].shape == (1, 3, 8, 8)  # the stream goes on into the next pass


def test_tar_cut_at_a_header_is_reported_not_silently_shortened(tmp_path):
    path = tmp_path / "00000.tar"
    write_shard(path, [good_sample(f"k{i}", i + 1) for i in range(3)])
    data = path.read_bytes()
    header = data.index(b"k2.jpg")  # cut in the middle of the third sample's first header block
    path.write_bytes(data[: header + 100])
    entries = list(read_tar_groups(str(path)))
    assert [e[0] for e in entries if not isinstance(e, SkippedSample)] == ["k0"]  # k1 may be incomplete: dropped
    assert isinstance(entries[-1], SkippedSample) and entries[-1].reason.startswith("truncated tar")
    assert entries[-1].key == "k1"


def test_bad_arguments_fail_early_naming_the_problem(tmp_path, transform):
    pattern = make_dataset(tmp_path, "d", shards=1, per_shard=2)
    with pytest.raises(ValueError, match="mixing ratio"):
        stage1_batches([(pattern, 0.0)], transform, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        stage1_batches([(pattern, 1.0)], transform, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="only local files"):
        stage1_batches([("pipe:curl -s https://example.com/{0..2}.tar", 1.0)], transform, 2, seed=0)
    with pytest.raises(FileNotFoundError, match="none of the 3 shards"):
        stage1_batches([(f"{tmp_path}/nowhere/{{0..2}}.tar", 1.0)], transform, 2, seed=0)


def test_shard_specs_and_caption_choice(tmp_path):
    for name in ("00000.tar", "00001.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert expand_shards("/a/{0..1}.tar::/b/x.tar") == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    assert expand_shards(["/a/{0..1}.tar", str(tmp_path)]) == ["/a/0.tar", "/a/1.tar", *expand_shards(str(tmp_path))]
    # .json "caption" first (what the original reads), then .txt
    assert sample_caption({"json": b'{"caption": "from json"}', "txt": b"from txt"}) == "from json"
    assert sample_caption({"json": b'{"caption": null, "url": "u"}', "txt": b"from txt"}) == "from txt"
    assert sample_caption({"jpg": b""}) is None
    with pytest.raises(ValueError, match="bad json"):
        sample_caption({"json": b"{broken"})


def gnu_sparse_member(name: str, real_size: int) -> bytes:
    """A GNU sparse tar member (type 'S') that declares `real_size` bytes but stores one 512-byte block at its end:
    what `tar --sparse` writes for a mostly-empty file. tarfile reads these, but cannot write them."""
    header = bytearray(512)

    def put(offset: int, value: bytes) -> None:
        header[offset:offset + len(value)] = value

    def octal(number: int, width: int) -> bytes:
        return b"%0*o\0" % (width - 1, number)

    put(0, name.encode())
    put(100, octal(0o644, 8))
    put(108, octal(0, 8))
    put(116, octal(0, 8))
    put(124, octal(512, 12))  # stored bytes
    put(136, octal(0, 12))
    put(156, b"S")
    put(257, b"ustar  \0")  # GNU magic
    put(386, octal(real_size - 512, 12) + octal(512, 12))  # sparse map: one data block at the end
    put(483, octal(real_size, 12))  # the size the member expands to
    put(148, b" " * 8)
    put(148, b"%06o\0 " % sum(header))
    return bytes(header) + b"\xff" * 512


def test_a_huge_sparse_member_is_skipped_from_its_header_without_reading_it(tmp_path, transform):
    rest = tmp_path / "rest.tar"
    write_shard(rest, [{"__key__": "huge", "txt": "a 2 GiB image"}, good_sample("ok-0", 0), good_sample("ok-1", 1)])
    shard = tmp_path / "00000.tar"
    shard.write_bytes(gnu_sparse_member("huge.jpg", 2**31) + rest.read_bytes())
    assert shard.stat().st_size < 100_000
    with tarfile.open(shard) as archive:  # the premise: tarfile expands it to 2 GiB of zeros on read()
        info = archive.next()
        assert info.issparse() and info.size == 2**31

    tracemalloc.start()
    try:
        entries = list(read_tar_groups(str(shard)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20  # reading the member would take 2 GiB
    assert isinstance(entries[0], SkippedSample) and entries[0].key == "huge"
    assert entries[0].reason == ("too large: member huge.jpg is 2147483648 bytes, over the limit "
                                 "max_image_bytes=67108864 (not read)")
    assert [entry[0] for entry in entries[1:]] == ["ok-0", "ok-1"]  # the rest of the shard is read

    # In training: skipped and counted, the limit from data.max_image_bytes.
    stream = stage1_batches([(str(shard), 1.0)], transform, 2, seed=0, shuffle_buffer=0, max_image_bytes=10**6)
    batch = next(stream)
    assert sorted(batch["key"]) == ["ok-0", "ok-1"]
    assert [s.key for s in batch["skipped"]] == ["huge"] and "max_image_bytes=1000000" in batch["skipped"][0].reason
    assert summarize_skips(batch["skipped"]) == "skipped 1 samples (1 too large)"


def test_a_member_over_a_small_limit_is_skipped_whatever_its_extension(tmp_path):
    shard = tmp_path / "00000.tar"
    write_shard(shard, [good_sample("ok", 1), {**good_sample("long-caption", 2), "txt": "x" * 5000}])
    limit = max(len(good_sample("ok", 1)["jpg"]), 1000) + 1
    entries = list(read_tar_groups(str(shard), max_member_bytes=limit))
    assert entries[0][0] == "ok"
    assert isinstance(entries[1], SkippedSample) and "long-caption.txt is 5000 bytes" in entries[1].reason


def test_resume_fast_forwards_without_decoding_or_reading_skipped_images(tmp_path, transform, monkeypatch):
    """Bad samples in the skipped part still land exactly (positions count them), and no skipped image is decoded
    or even read: only the caption members of the skipped samples are."""
    import minigpt4.data.pipeline as pipeline

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        samples = [good_sample(f"s{shard}-{i:02d}", i) for i in range(12)]
        samples[3] = {"__key__": f"bad{shard}", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken"}  # skipped at decode
        write_shard(folder / f"{shard:05d}.tar", samples)
    pattern = f"{folder}/{{00000..00002}}.tar"
    options = dict(seed=4, shuffle_buffer=4)
    full = take(stage1_batches([(pattern, 1.0)], transform, 3, **options), 14)  # past the first pass (33 good)
    assert sum(len(b["skipped"]) for b in full[:8]) >= 2

    decoded, image_reads = [], []
    real_load, real_extract = pipeline.load_image, tarfile.TarFile.extractfile
    monkeypatch.setattr(pipeline, "load_image", lambda data, **kw: decoded.append(1) or real_load(data, **kw))

    def counting_extract(archive, member):
        if not member.name.endswith((".txt", ".json")):
            image_reads.append(member.name)
        return real_extract(archive, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting_extract)
    resumed = stage1_batches([(pattern, 1.0)], transform, 3, start_batch=8, positions=positions_before(full[:8]),
                             **options)
    first = next(resumed)
    assert len(decoded) == 3 + len(first["skipped"])  # the 3 images of the batch, and any bad one met on the way
    assert len(image_reads) <= options["shuffle_buffer"] + 3  # not the 24+ images passed over
    assert same_batches(full[8:], [first, *take(resumed, 5)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_without_a_usable_sample_ends_after_one_pass(tmp_path, transform, num_workers):
    from minigpt4.data import NoUsableData

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        write_shard(folder / f"{shard:05d}.tar", [
            {"__key__": f"bad-{shard}-{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": "a caption"} for i in range(5)
        ] + [{"__key__": f"empty-{shard}", "jpg": encode(synthetic(1)), "txt": "  "}])
    stream = stage1_batches([(str(folder), 1.0)], transform, 2, seed=0, num_workers=num_workers)
    with hang_guard(120), pytest.raises(NoUsableData, match=r"no usable sample in a whole pass of reader .*\(\d+ "
                                                            r"skipped: \d+ corrupt image, \d+ empty caption\); run "
                                                            "`minigpt4 data check "):
        next(stream)

    empty = tmp_path / "empty"
    empty.mkdir()
    write_shard(empty / "00000.tar", [])
    with hang_guard(120), pytest.raises(NoUsableData, match="found no sample at all in a whole pass"):
        next(stage1_batches([(str(empty), 1.0)], transform, 2, seed=0, num_workers=num_workers))
