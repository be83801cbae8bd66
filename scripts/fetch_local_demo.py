"""Run `minigpt4 fetch minigpt4-7b` against a local server: generated files, one cut connection.

    PYTHONPATH=src .venv/bin/python scripts/fetch_local_demo.py [--size-mb 64]

The two plain files come from a real HTTP server on 127.0.0.1 (tests/hub/fileserver.py, rate-limited
so the progress bar shows a rate and ETA; the ViT's first transfer is cut part-way), the Hub files from a
Hugging Face cache written beforehand (HF_HUB_OFFLINE=1). Everything lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hub.fileserver import FileServer, Served  # noqa: E402
from tests.hub.hubcache import populate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64, help="size of the generated eva_vit_g.pth")
    args = parser.parse_args()
    vit, blip2 = os.urandom(args.size_mb << 20), os.urandom(4 << 20)
    with tempfile.TemporaryDirectory() as tmp, FileServer(rate=16 << 20) as server:
        hub = Path(tmp) / "hub"
        populate(hub, "Vision-CAIR/vicuna-7b", {"config.json": b"{}", "model.safetensors": os.urandom(1 << 20)})
        populate(hub, "Vision-CAIR/minigpt4", {"prerained_minigpt4_7b.pth": os.urandom(1 << 16)}, repo_type="space")
        for name, data, faults in (("eva_vit_g.pth", vit, ["cut"]), ("blip2_pretrained_flant5xxl.pth", blip2, [])):
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            server.files["/" + name] = Served(data, headers={"x-goog-hash": f"crc32c=AAAAAA==,md5={md5}"},
                                              faults=faults)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MINIGPT4_CACHE": f"{tmp}/cache",
               "MINIGPT4_MIRROR": server.base, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
               "MINIGPT4_HTTP_BACKOFF": "1"}
        for extra in ([], ["--verify"]):
            command = [sys.executable, "-m", "minigpt4.cli", "fetch", "minigpt4-7b", *extra]
            print(f"$ MINIGPT4_MIRROR={server.base} HF_HUB_OFFLINE=1 minigpt4 fetch minigpt4-7b {' '.join(extra)}",
                  flush=True)
            code = subprocess.call(command, env=env)
            print(f"(exit {code})", flush=True)
        print("server log (path, Range):", *server.requests, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
