"""`minigpt4 data`: build webdataset shards from images and captions, and check shards or an aligned folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from minigpt4.commands import CommandError
from minigpt4.commands.paths import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    make = sub.add_parser(
        "make-shards",
        help="write img2dataset-style shards (KEY.jpg + KEY.json + KEY.txt) from images with captions",
        description="Either --captions TABLE (JSONL, JSON list, CSV or TSV with an image path and a caption per "
        "record) with --images DIR, or --from DIR (an img2dataset output folder: its .tar shards, or its "
        "files layout KEY.jpg + KEY.json/KEY.txt). Images that do not decode and empty captions are skipped.",
    )
    make.add_argument("out", type=Path, help="output folder for 00000.tar, 00001.tar, ...")
    make.add_argument("--captions", type=Path, help="caption table: .jsonl, .json, .csv or .tsv")
    make.add_argument("--images", type=Path, help="folder the table's image paths are relative to "
                      "(default: the table's folder)")
    make.add_argument("--from", dest="from_dir", type=Path, help="an img2dataset output folder")
    make.add_argument("--image-col", default="image", help="the table's image path column (default: image)")
    make.add_argument("--caption-col", default="caption", help="the table's caption column (default: caption)")
    make.add_argument("--per-shard", type=int, default=10000, help="samples per shard (default 10000, as img2dataset)")

    check = sub.add_parser("check", help="validate shards or cc_sbu_align folders; non-zero exit if anything is broken",
                           description="Each PATH is a cc_sbu_align folder (holding filter_cap.json), a shard "
                           "folder, a .tar file or a brace pattern such as '/d/{00000..00009}.tar' (quote it).")
    check.add_argument("paths", nargs="+", help="what to check")
    check.add_argument("--workers", type=int, default=1, help="processes reading shards in parallel (default 1)")
    check.add_argument("--max-listed", type=int, default=50, help="broken samples listed per path (default 50)")


def run(args: argparse.Namespace) -> int:
    return _make_shards(args) if args.action == "make-shards" else _check(args)


def _make_shards(args: argparse.Namespace) -> int:
    from minigpt4.data import summarize_skips
    from minigpt4.data.shards import ShardWriter, samples_from_img2dataset, samples_from_table, write_samples

    if (args.captions is None) == (args.from_dir is None):
        raise CommandError("give either --captions TABLE (with --images DIR) or --from IMG2DATASET_DIR")
    if args.per_shard < 1:
        raise CommandError(f"--per-shard must be at least 1, got {args.per_shard}")
    check_output_folder(args.out, "the output folder")
    if args.captions is not None:
        if not args.captions.is_file():
            raise CommandError(f"caption table {args.captions} not found")
        if args.images is not None and not args.images.is_dir():
            raise CommandError(f"--images {args.images} is not a folder")
        samples = samples_from_table(args.captions, args.images or args.captions.parent, args.image_col,
                                     args.caption_col)
    else:
        if not args.from_dir.is_dir():
            raise CommandError(f"--from {args.from_dir} is not a folder")
        samples = samples_from_img2dataset(args.from_dir)
    try:
        with ShardWriter(args.out, args.per_shard) as writer:
            skipped = write_samples(samples, writer)
    except ValueError as err:  # a caption table without the named columns, or not a table at all
        raise CommandError(str(err)) from err
    for skip in skipped:
        print(f"skipped {skip}")
    print(f"wrote {writer.written} samples in {len(writer.shards)} shard(s) to {args.out}; {summarize_skips(skipped)}")
    if writer.shards:
        last = len(writer.shards) - 1
        print(f"stage-1 source: {args.out.resolve()}/{{{0:05d}..{last:05d}}}.tar")
    return 0 if writer.written else 1


def _check(args: argparse.Namespace) -> int:
    from minigpt4.data import summarize_skips
    from minigpt4.data.check import check_path

    if args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}")
    if args.max_listed < 0:
        raise CommandError(f"--max-listed must be 0 or more, got {args.max_listed}")
    broken_total = 0
    for path in args.paths:
        report = check_path(path, workers=args.workers, progress=True)
        for skip in report.broken[: args.max_listed]:
            print(f"BROKEN {skip}")
        if len(report.broken) > args.max_listed:
            print(f"... and {len(report.broken) - args.max_listed} more")
        status = "OK" if not report.broken else "BROKEN"
        notes = "; ".join(report.notes)
        print(f"{status} {path} ({report.kind}): {report.ok} good samples, {len(report.broken)} broken"
              f"{'; ' + notes if notes else ''}")
        if report.broken:
            print(f"    {summarize_skips(report.broken).replace('skipped', 'broken:', 1)}")
        broken_total += len(report.broken)
    if len(args.paths) > 1:
        print(f"total: {broken_total} broken in {len(args.paths)} paths")
    return 1 if broken_total else 0
