"""Stage 2: the cc_sbu_align folder (raw captions, drop_last, rank split, exact resume) and the prompts file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from minigpt4.data.aligned import stage2_batches
from minigpt4.data.prompts import load_prompts
from minigpt4.processing.image import eval_transform, train_transform
from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE

from .conftest import hang_guard, make_aligned, positions_before, same_batches, take


def test_batches_hold_raw_captions_and_each_pass_uses_each_pair_once(tmp_path, transform):
    root = make_aligned(tmp_path, 11)
    batches = take(stage2_batches(str(root), transform, 3, seed=0), 6)  # 3 batches per pass, 2 pairs dropped
    assert all(b["image"].shape == (3, 3, 8, 8) for b in batches)
    first_pass = [key for b in batches[:3] for key in b["key"]]
    assert len(set(first_pass)) == 9 and set(first_pass) <= {str(i) for i in range(1, 12)}
    assert batches[0]["text"][0] == f"The image shows Item {batches[0]['key'][0]}. It is, indeed, NICE!"  # untouched
    second_pass = [key for b in batches[3:] for key in b["key"]]
    assert second_pass != first_pass  # reshuffled by seed + pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_yields_exactly_the_tail_of_the_full_run(tmp_path, num_workers):
    root = make_aligned(tmp_path, 10)
    augment = train_transform(8)
    options = dict(seed=5, num_workers=num_workers)
    full = take(stage2_batches(str(root), augment, 2, **options), 9)
    again = take(stage2_batches(str(root), augment, 2, **options), 9)
    positions = positions_before(full[:5])
    resumed = take(stage2_batches(str(root), augment, 2, start_batch=5, positions=positions, **options), 4)  # odd
    assert same_batches(full, again)
    assert same_batches(full[5:], resumed)


def test_two_ranks_two_workers_split_without_duplicates(tmp_path, transform):
    root = make_aligned(tmp_path, 16)
    keys = []
    for rank in range(2):
        stream = stage2_batches(str(root), transform, 2, seed=1, rank=rank, world_size=2, num_workers=2)
        keys += [key for b in take(stream, 4) for key in b["key"]]  # 4 readers x 4 pairs = 2 batches each
    assert sorted(keys, key=int) == [str(i) for i in range(1, 17)]


def test_missing_corrupt_and_empty_are_skipped_and_reported(tmp_path, transform, caplog):
    root = make_aligned(tmp_path, 6)
    (root / "image" / "2.jpg").write_bytes(b"not a jpeg at all")
    (root / "image" / "3.jpg").unlink()
    data = json.loads((root / "filter_cap.json").read_text())
    data["annotations"][3]["caption"] = "   "  # image 4
    (root / "filter_cap.json").write_text(json.dumps(data))
    batches = take(stage2_batches(str(root), transform, 1, seed=0), 4)  # one pass (3 good) + one more
    assert sorted(key for b in batches[:3] for key in b["key"]) == ["1", "5", "6"]
    skipped = {(s.key, s.reason.split(":")[0], s.source.rsplit("/", 1)[-1]) for b in batches for s in b["skipped"]}
    assert skipped == {("2", "corrupt image", "2.jpg"), ("3", "missing image", "3.jpg"),
                       ("4", "empty caption", "filter_cap.json")}
    assert "2.jpg [2]: corrupt image" in caplog.text


def test_bad_folders_fail_early_with_the_fix(tmp_path, transform):
    with pytest.raises(FileNotFoundError, match="filter_cap.json"):
        stage2_batches(str(tmp_path), transform, 2, seed=0)
    root = make_aligned(tmp_path / "small", 5)
    with pytest.raises(ValueError, match="lower batch_size or num_workers"):
        stage2_batches(str(root), transform, 2, seed=0, num_workers=3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "filter_cap.json").write_text('[{"image_id": 1}]')
    with pytest.raises(ValueError, match="annotations"):
        stage2_batches(str(tmp_path / "bad"), transform, 2, seed=0)


def test_default_prompts_are_four_image_instructions_in_the_template():
    prompts = load_prompts(None, VICUNA_V0_TEMPLATE)
    assert len(prompts) == 4 and len(set(prompts)) == 4
    for prompt in prompts:
        assert prompt.startswith("###Human: <Img><ImageHere></Img> ") and prompt.endswith(" ###Assistant: ")
        assert prompt.count("<ImageHere>") == 1


def test_prompt_file_lines_without_placeholder_are_dropped(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_text("<Img><ImageHere></Img> Describe it.\n\nno placeholder here\n<ImageHere> What is this?\n")
    assert load_prompts(str(path), "{}") == ["<Img><ImageHere></Img> Describe it.", "<ImageHere> What is this?"]
    assert "no placeholder here" in caplog.text
    # Kept byte for byte, like the original's splitlines(): a trailing space is part of the prompt.
    path.write_text("<Img><ImageHere></Img> Describe this image in detail. \n")
    assert load_prompts(str(path), "###Human: {} ###Assistant: ") == [
        "###Human: <Img><ImageHere></Img> Describe this image in detail.  ###Assistant: "
    ]
    path.write_text("nothing usable\n")
    with pytest.raises(ValueError, match="no prompt containing <ImageHere>"):
        load_prompts(str(path), "{}")
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts(None, "no slot")


def test_skips_found_in_worker_processes_reach_the_batches(tmp_path, transform):
    root = make_aligned(tmp_path, 8)
    (root / "image" / "6.jpg").write_bytes(b"\x89PNG broken")
    stream = stage2_batches(str(root), transform, 1, seed=2, num_workers=2)
    batches = take(stream, 8)  # 4 from each worker: at least its whole first pass (4 pairs, 3 if it met the bad one)
    assert {key for b in batches for key in b["key"]} == {"1", "2", "3", "4", "5", "7", "8"}
    skips = [s for b in batches for s in b["skipped"]]
    assert skips and {(s.key, s.reason.split(":")[0]) for s in skips} == {("6", "corrupt image")}


def test_huge_files_fifos_folders_and_devices_are_skipped_unread(tmp_path, transform):
    root = make_aligned(tmp_path, 6)
    images = root / "image"
    (images / "2.jpg").unlink()
    with open(images / "2.jpg", "wb") as handle:
        handle.truncate(2**31)  # 2 GiB, sparse
    (images / "3.jpg").unlink()
    os.mkfifo(images / "3.jpg")  # reading would wait for a writer forever
    (images / "4.jpg").unlink()
    (images / "4.jpg").mkdir()
    (images / "5.jpg").unlink()
    (images / "5.jpg").symlink_to("/dev/zero")  # endless zeros
    batches = take(stage2_batches(str(root), transform, 1, seed=0, max_image_bytes=10**6), 2)  # one pass
    assert sorted(key for b in batches for key in b["key"]) == ["1", "6"]
    skipped = {s.key: s.reason for b in batches for s in b["skipped"]}
    assert skipped["2"].startswith("too large: image ") and "2147483648 bytes" in skipped["2"]
    assert "max_image_bytes=1000000" in skipped["2"]
    assert skipped["3"].startswith("unreadable image: ") and "FIFO" in skipped["3"]
    assert skipped["4"].startswith("unreadable image: ") and "directory" in skipped["4"]
    assert skipped["5"].startswith("unreadable image: ") and "is a device" in skipped["5"]


def test_exif_orientation_is_applied_in_training(tmp_path, sideways_jpeg):
    root = make_aligned(tmp_path, 1)
    (root / "image" / "1.jpg").write_bytes(sideways_jpeg(8))
    batch = next(stage2_batches(str(root), eval_transform(8), 1, seed=0))
    upright = Image.open(root / "image" / "1.jpg").transpose(Image.Transpose.ROTATE_90)  # what 8 asks for
    assert upright.size == (20, 40)
    assert torch.equal(batch["image"][0], eval_transform(8)(upright.convert("RGB")))


def test_a_folder_whose_images_are_all_missing_ends_after_one_pass(tmp_path, transform):
    from minigpt4.data import NoUsableData

    root = make_aligned(tmp_path, 6)
    for image in (root / "image").iterdir():
        image.unlink()
    with hang_guard(120), pytest.raises(NoUsableData, match=r"no usable sample in a whole pass of reader 0 of 1 "
                                                            r"\(6 skipped: 6 missing image\)"):
        next(stage2_batches(str(root), transform, 2, seed=0))


def test_a_folder_with_fewer_usable_pairs_than_a_batch_ends_after_one_pass(tmp_path, transform):
    """drop_last per pass: 3 usable pairs never make a batch of 4, so the stream would spin forever."""
    from minigpt4.data import NoUsableData

    root = make_aligned(tmp_path, 8)
    for image_id in range(1, 6):
        (root / "image" / f"{image_id}.jpg").unlink()
    with hang_guard(120), pytest.raises(NoUsableData, match=r"only 3 usable samples in a whole pass of reader 0 of 1, "
                                                            r"fewer than one batch of 4"):
        next(stage2_batches(str(root), transform, 4, seed=0))
