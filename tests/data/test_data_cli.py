"""`minigpt4 data make-shards` and `minigpt4 data check`, run through the real command line entry point."""

from __future__ import annotations

import csv
import json
import tarfile

from minigpt4.cli import main
from minigpt4.data.webdataset import stage1_batches

from .conftest import PHOTOS, make_aligned, photo, synthetic


def _photo_folder(folder):
    """Real photos as PNG and JPEG, plus one file that is not an image."""
    folder.mkdir()
    names = []
    for index, name in enumerate(PHOTOS):
        file = f"{name}.{'png' if index % 2 else 'jpg'}"
        photo(name, 64).save(folder / file)
        names.append(file)
    synthetic(3).save(folder / "gradient.webp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return names + ["gradient.webp"]


def test_make_shards_from_jsonl_then_check_then_train_reads_them(tmp_path, capsys, transform):
    names = _photo_folder(tmp_path / "photos")
    table = tmp_path / "captions.jsonl"
    records = [{"image": name, "caption": f"A photo of {name.split('.')[0]}."} for name in names]
    records += [{"image": "broken.jpg", "caption": "a broken file"}, {"image": "chelsea.jpg", "caption": ""},
                {"image": "absent.jpg", "caption": "no such file"}]
    table.write_text("\n".join(json.dumps(r) for r in records) + "\n")

    out = tmp_path / "shards"
    code = main(["data", "make-shards", str(out), "--captions", str(table), "--images", str(tmp_path / "photos"),
                 "--per-shard", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "wrote 5 samples in 3 shard(s)" in printed
    assert "skipped 3 samples (1 corrupt image, 1 empty caption, 1 missing image)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(out / "00000.tar") as archive:  # img2dataset layout: KEY.jpg, KEY.json, KEY.txt
        # keys: shard number (5 digits) + index in shard (as many digits as per-shard needs)
        assert archive.getnames() == ["000000.jpg", "000000.json", "000000.txt",
                                      "000001.jpg", "000001.json", "000001.txt"]
        meta = json.loads(archive.extractfile("000001.json").read())
    assert meta["caption"] == "A photo of coffee." and meta["key"] == "000001" and meta["url"] == "coffee.png"

    assert main(["data", "check", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    stream = stage1_batches([(f"{out}/{{00000..00002}}.tar", 1.0)], transform, 5, seed=0)
    batch = next(stream)
    assert sorted(batch["text"]) == sorted(f"a photo of {name.split('.')[0]}" for name in names)


def test_make_shards_from_csv_and_from_img2dataset_output(tmp_path, capsys):
    names = _photo_folder(tmp_path / "photos")
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "text"])
        writer.writerows([name, f"caption, for {name}"] for name in names)
    first = tmp_path / "first"
    # Without --images, paths are relative to the table's folder, where these images are not: nothing written.
    assert main(["data", "make-shards", str(first), "--captions", str(table), "--image-col", "file",
                 "--caption-col", "text"]) == 1
    assert "wrote 0 samples in 0 shard(s)" in capsys.readouterr().out
    assert main(["data", "make-shards", str(first), "--captions", str(table), "--images", str(tmp_path / "photos"),
                 "--image-col", "file", "--caption-col", "text", "--per-shard", "3"]) == 0
    assert "wrote 5 samples in 2 shard(s)" in capsys.readouterr().out

    # img2dataset output_format=files: 00000/KEY.jpg + KEY.json (+ KEY.txt)
    files = tmp_path / "img2dataset" / "00000"
    files.mkdir(parents=True)
    for index in range(3):
        synthetic(index).save(files / f"00000000{index}.jpg")
        (files / f"00000000{index}.json").write_text(json.dumps({"caption": f"gradient {index}", "url": f"u{index}"}))
    (files / "000000009.jpg").write_bytes(b"garbage")
    (files / "000000009.txt").write_text("garbage")
    resharded = tmp_path / "from-files"
    assert main(["data", "make-shards", str(resharded), "--from", str(tmp_path / "img2dataset")]) == 0
    assert "wrote 3 samples in 1 shard(s)" in capsys.readouterr().out
    # ... and an img2dataset webdataset folder, re-sharded
    again = tmp_path / "again"
    assert main(["data", "make-shards", str(again), "--from", str(first), "--per-shard", "10"]) == 0
    assert "wrote 5 samples in 1 shard(s)" in capsys.readouterr().out


def test_check_lists_what_is_broken_and_fails(tmp_path, capsys):
    root = make_aligned(tmp_path / "align", 4)
    (root / "image" / "2.jpg").write_bytes(b"broken")
    (root / "image" / "4.jpg").unlink()
    synthetic(9).save(root / "image" / "77.jpg")
    shards = tmp_path / "shards"
    shards.mkdir()
    table = tmp_path / "t.jsonl"
    synthetic(1).save(tmp_path / "a.jpg")
    table.write_text("\n".join(json.dumps({"image": "a.jpg", "caption": f"c{i}"}) for i in range(6)))
    assert main(["data", "make-shards", str(shards), "--captions", str(table), "--per-shard", "3"]) == 0
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: data.index(b"000011.jpg") + 600])  # inside 000011's image
    capsys.readouterr()

    assert main(["data", "check", str(root), str(shards), str(tmp_path / "absent")]) == 1
    printed = capsys.readouterr().out
    assert "BROKEN" in printed and f"{root}/image/2.jpg [2]: corrupt image" in printed
    assert f"{root}/image/4.jpg [4]: missing image" in printed
    assert f"BROKEN {root} (aligned): 2 good samples, 2 broken; 4 annotation(s); 1 image(s)" in printed
    assert f"{shards}/00001.tar [000011]: truncated tar" in printed
    assert f"BROKEN {shards} (shards): 4 good samples, 1 broken" in printed
    assert f"BROKEN {tmp_path}/absent: missing shard" in printed
    assert main(["data", "check", "--workers", "2", str(shards)]) == 1  # same report from worker processes
    assert f"BROKEN {shards}/00001.tar [000011]: truncated tar" in capsys.readouterr().out
    assert main(["data", "check", str(make_aligned(tmp_path / "good", 3))]) == 0


def test_check_fails_on_data_without_a_usable_sample(tmp_path, capsys):
    from .conftest import write_shard

    empty_tar = tmp_path / "one" / "00000.tar"
    empty_tar.parent.mkdir()
    write_shard(empty_tar, [])
    assert main(["data", "check", str(empty_tar)]) == 1
    assert f"BROKEN {empty_tar}: no usable sample" in capsys.readouterr().out
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(3):
        write_shard(folder / f"{index:05d}.tar", [])
    assert main(["data", "check", str(folder)]) == 1
    printed = capsys.readouterr().out
    assert f"BROKEN {folder} (shards): 0 good samples, 1 broken; 3 shard(s)" in printed
    assert f"BROKEN {folder}: no usable sample" in printed
