"""`minigpt4 chat` and `minigpt4 caption` on the tiny model, through the real entry point (and as a subprocess)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from minigpt4.chat import Chat
from minigpt4.cli import main
from minigpt4.model.tiny import RANDOM_MARKER
from minigpt4.processing.image import eval_transform

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def cat_file(photo, tmp_path):
    path = tmp_path / "cat.jpg"
    photo.save(path)
    return path


def _expected_answer(tiny_model, photo, question: str, max_new_tokens: int) -> str:
    chat = Chat(tiny_model, eval_transform(tiny_model.config.vision.image_size))
    chat.upload(photo.copy())
    chat.ask(question)
    return chat.answer(do_sample=False, max_new_tokens=max_new_tokens)


def test_chat_answers_once(tiny_llm_dir, tiny_model, photo, cat_file, capsys):
    rc = main(["chat", "--preset", "tiny", "--image", str(cat_file), "--greedy", "--max-new-tokens", "6",
               "What is in this picture?", f"llm.path={tiny_llm_dir}"])
    out = capsys.readouterr().out
    assert rc == 0
    from PIL import Image

    expected = _expected_answer(tiny_model, Image.open(cat_file), "What is in this picture?", 6)
    assert out.rstrip("\n").splitlines()[-1] == expected


def test_chat_from_a_saved_checkpoint(tiny_model, photo, cat_file, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    rc = main(["chat", "--checkpoint", str(tmp_path / "model"), "--image", str(cat_file), "--greedy",
               "--max-new-tokens", "5", "--no-stream", "Describe this image in detail."])
    assert rc == 0
    from PIL import Image

    expected = _expected_answer(tiny_model, Image.open(cat_file), "Describe this image in detail.", 5)
    assert capsys.readouterr().out.rstrip("\n").splitlines()[-1] == expected


def test_chat_interactive_session(tiny_llm_dir, cat_file, monkeypatch, capsys):
    lines = [f"/image {cat_file}", "What is in this picture?", "/image /nonexistent/x.png", "/bogus", "/reset", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = main(["chat", "--preset", "tiny", "--greedy", "--max-new-tokens", "4", f"llm.path={tiny_llm_dir}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"(image {cat_file} added)" in out
    assert "minigpt4> " in out
    assert "error:" in out and "x.png" in out
    assert "unknown command /bogus" in out
    assert "(new conversation)" in out


def test_chat_rejects_bad_settings_and_files(tiny_llm_dir, tmp_path, capsys):
    assert main(["chat", "--preset", "tiny", "--top-p", "3", "hi", f"llm.path={tiny_llm_dir}"]) == 2
    assert "GenerationSettings.top_p=3.0" in capsys.readouterr().err
    assert main(["chat", "--preset", "tiny", "--image", str(tmp_path / "nope.png"), "hi",
                 f"llm.path={tiny_llm_dir}"]) == 2
    assert "no such file" in capsys.readouterr().err


def _shard(path, photo, keys):
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", buffer.getvalue()), ("txt", b"a cat")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_caption_folder_and_shards_resumable(tiny_llm_dir, photo, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    photo.save(folder / "a.png")
    photo.rotate(90).save(folder / "sub" / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shard = tmp_path / "shard-000.tar"
    _shard(shard, photo, ["000001", "000002"])
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--preset", "tiny", "-o", str(out), "--batch-size", "2", "--max-new-tokens", "4",
            str(folder), str(shard), f"llm.path={tiny_llm_dir}"]
    assert main(args) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in records] == ["a.png", "sub/b.jpg", "000001", "000002"]
    assert all(set(r) == {"key", "source", "caption", "finish_reason"} for r in records)
    assert records[2]["source"] == str(shard)
    assert "4 captioned, 0 already done, 1 skipped" in err and "broken.png" in err

    # Greedy captions are deterministic and don't depend on the batch: rerunning only the missing keys
    # (one record lost, as after a crash) gives back the same record.
    out.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    assert main(args) == 0
    assert "1 captioned, 3 already done" in capsys.readouterr().err
    assert [json.loads(line) for line in out.read_text().splitlines()] == records

    # A kill mid-write leaves half a line without its newline: it is dropped, and the record written after it
    # starts on a line of its own (not glued to the fragment).
    out.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + json.dumps(records[3])[:25])
    assert main(args) == 0
    assert "1 captioned, 3 already done" in capsys.readouterr().err
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    # Any other line that is not a record is an error naming it, not silently captioned again.
    out.write_text(json.dumps(records[0]) + "\nnot json\n" + json.dumps(records[1]) + "\n")
    assert main(args) == 2
    assert f"{out} line 2 is not a caption record" in capsys.readouterr().err

    # A list file names inputs too; a missing entry is skipped and counted.
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{folder / 'a.png'}\n{tmp_path / 'gone.png'}\n")
    other = tmp_path / "other.jsonl"
    assert main(["caption", "--preset", "tiny", "-o", str(other), "--max-new-tokens", "4", f"@{listing}",
                 f"llm.path={tiny_llm_dir}"]) == 0
    assert "1 captioned, 0 already done, 1 skipped" in capsys.readouterr().err
    assert json.loads(other.read_text())["caption"] == records[0]["caption"]


@pytest.mark.parametrize("command", ["chat", "caption", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--preset" in capsys.readouterr().out


@pytest.fixture
def unreadable(tmp_path):
    """Paths that must never be read as images: a device, a FIFO, a folder, and a 2 GiB (sparse) file."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(2**31)
    return {"device": "/dev/zero", "fifo": str(fifo), "directory": str(folder), "huge": str(huge)}


def _finishes(call, seconds: float = 60.0):
    """call() in a thread: its result, or a test failure if it is still running (reading) after `seconds`."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return result[0]


@pytest.mark.parametrize("kind, phrase", [
    ("device", "is a device, not a regular file"), ("fifo", "is a FIFO (named pipe), not a regular file"),
    ("directory", "is a directory, not a regular file"), ("huge", "2147483648 bytes, over the limit max_image_bytes="),
])
def test_chat_refuses_devices_fifos_folders_and_huge_files_in_one_line(tiny_llm_dir, unreadable, kind, phrase, capsys):
    args = ["chat", "--preset", "tiny", "--image", unreadable[kind], "hi", f"llm.path={tiny_llm_dir}"]
    rc = _finishes(lambda: main(args))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err and unreadable[kind] in err


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_caption_refuses_a_device_or_fifo_input_in_one_line(tiny_llm_dir, unreadable, tmp_path, kind, capsys):
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--preset", "tiny", "-o", str(out), unreadable[kind], f"llm.path={tiny_llm_dir}"]
    rc = _finishes(lambda: main(args))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert unreadable[kind] in err and "not a regular file or a folder" in err
    assert not out.exists()


def test_caption_skips_and_counts_what_cannot_be_read(tiny_llm_dir, photo, unreadable, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    photo.save(folder / "a.png")
    os.replace(unreadable["huge"], folder / "huge.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder}\n{unreadable['device']}\n{unreadable['fifo']}\n")
    out = tmp_path / "captions.jsonl"
    rc = _finishes(lambda: main(["caption", "--preset", "tiny", "-o", str(out), "--max-new-tokens", "2", f"@{listing}",
                                 f"llm.path={tiny_llm_dir}"]))
    err = capsys.readouterr().err
    assert rc == 0
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == ["a.png"]
    assert "1 captioned, 0 already done, 3 skipped" in err
    assert "[huge.jpg] is 2147483648 bytes, over the limit max_image_bytes=" in err
    assert f"{unreadable['fifo']}: not a regular file" in err and "/dev/zero: not a regular file" in err


# ---- interactive input that ends, or never comes, ends the session without spinning

def _chat_process(tiny_llm_dir, tmp_path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "minigpt4.cli", "chat", "--preset", "tiny", "--greedy", "--max-new-tokens", "3",
            f"llm.path={tiny_llm_dir}"]
    return subprocess.Popen(argv, env=env, cwd=tmp_path, **popen)


def test_chat_with_no_input_ends_cleanly(tiny_llm_dir, tmp_path):
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        process = _chat_process(tiny_llm_dir, tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        assert process.wait(timeout=300) == 0
    assert (tmp_path / "out.txt").read_text().count("you> ") == 1


def test_chat_reads_questions_from_a_file_until_it_ends(tiny_llm_dir, tmp_path):
    (tmp_path / "questions.txt").write_text("What is in this picture?\nAnd what colour is it?\n")
    with open(tmp_path / "questions.txt") as questions, open(tmp_path / "out.txt", "w") as out, \
            open(tmp_path / "err.txt", "w") as err:
        process = _chat_process(tiny_llm_dir, tmp_path, stdin=questions, stdout=out, stderr=err)
        assert process.wait(timeout=300) == 0
    printed = (tmp_path / "out.txt").read_text()
    assert printed.count("minigpt4> ") == 2 and printed.count("you> ") == 3  # two answers, then end of input


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_chat_waiting_on_a_silent_pipe_sleeps_and_ends_when_it_closes(tiny_llm_dir, tmp_path):
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        process = _chat_process(tiny_llm_dir, tmp_path, stdin=subprocess.PIPE, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while "you> " not in (tmp_path / "out.txt").read_text():  # the model is loaded and the prompt is up
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            before = _cpu_seconds(process.pid)
            time.sleep(3)
            assert _cpu_seconds(process.pid) - before < 1.0  # blocked on the read, not spinning
            process.stdin.close()  # the pipe closes without a line ever sent
            assert process.wait(timeout=60) == 0
        finally:
            process.kill()


# ---- no silent random weights

def test_random_weights_are_announced(tiny_llm_dir, tiny_model, cat_file, tmp_path, capsys):
    assert main(["chat", "--preset", "tiny", "--image", str(cat_file), "--max-new-tokens", "2", "hi",
                 f"llm.path={tiny_llm_dir}"]) == 0
    assert "random weights: LLM, vision tower, Q-Former, projection" in capsys.readouterr().err

    # A saved model: its towers and projection are its own, but its LLM folder is still the random tiny one.
    tiny_model.save_pretrained(tmp_path / "model")
    assert main(["chat", "--checkpoint", str(tmp_path / "model"), "--max-new-tokens", "2", "hi"]) == 0
    assert "random weights: LLM (" in capsys.readouterr().err

    # The same saved model pointing at an LLM folder that is not marked random: no banner.
    shutil.copytree(tiny_llm_dir, tmp_path / "llm", ignore=shutil.ignore_patterns(RANDOM_MARKER))
    tiny_model.config.llm.path = str(tmp_path / "llm")
    tiny_model.save_pretrained(tmp_path / "real")
    assert main(["chat", "--checkpoint", str(tmp_path / "real"), "--max-new-tokens", "2", "hi"]) == 0
    assert "random weights" not in capsys.readouterr().err


def test_random_parts_by_weight_source(tmp_path):
    from minigpt4.config import model_preset
    from minigpt4.model.build import random_parts

    llm = str(tmp_path)  # a folder without the tiny LLM's marker
    released = model_preset("minigpt4-7b")
    assert random_parts(released, llm) == ["vision tower", "Q-Former", "projection"]
    released.weights.vit, released.weights.blip2 = "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"
    assert random_parts(released, llm) == ["projection"]
    released.weights.projection = "prerained_minigpt4_7b.pth"
    assert random_parts(released, llm) == []
    embedded = model_preset("embedded")
    assert random_parts(embedded, llm) == ["Q-Former", "projection"]
    embedded.weights.pretrained = "quickstart/model"
    assert random_parts(embedded, llm) == []
    (tmp_path / RANDOM_MARKER).write_text("random\n")
    assert random_parts(embedded, llm) == ["LLM"]


# ---- caption: a record is its source and its key

def test_caption_same_names_in_different_places_are_different_records(tiny_llm_dir, photo, tmp_path, monkeypatch,
                                                                      capsys):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        photo.save(tmp_path / folder / "img.png")
        _shard(tmp_path / f"{folder}.tar", photo, ["000001"])
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--preset", "tiny", "-o", str(out), "--max-new-tokens", "2", "x", "y", "x.tar", "y.tar",
            f"llm.path={tiny_llm_dir}"]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    assert "4 captioned, 0 already done" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["key"]) for r in records] == [("x", "img.png"), ("y", "img.png"),
                                                          ("x.tar", "000001"), ("y.tar", "000001")]
    out.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[2]) + "\n")  # as if stopped after two
    assert main(args) == 0
    assert "2 captioned, 2 already done" in capsys.readouterr().err
    assert sorted((r["source"], r["key"]) for r in map(json.loads, out.read_text().splitlines())) == sorted(
        (r["source"], r["key"]) for r in records)


# ---- the CLI does not import the tests' helpers

def test_cli_does_not_import_the_test_helpers(tmp_path):
    """`--help` of every command and a tiny-preset run load neither minigpt4.testing nor pytest."""
    script = (
        "import sys\n"
        "from minigpt4.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['loss', '--preset', 'tiny', '--text', 'a cat']) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith(('minigpt4', 'pytest'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MINIGPT4_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    modules = done.stdout.strip().splitlines()[-1]
    assert "minigpt4.commands.loss" in modules and "minigpt4.model.tiny" in modules
    assert "minigpt4.testing" not in modules and "pytest" not in modules
    assert (tmp_path / "tiny-llm" / RANDOM_MARKER).is_file()  # the tiny preset's LLM, built on first use
