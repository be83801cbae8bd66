"""Ask a MiniGPT-4 exported by `minigpt4 export --format transformers` about an image, with transformers alone.

    python examples/transformers_only.py EXPORTED_FOLDER IMAGE "QUESTION"

prints the greedy answer: the one `minigpt4 chat --checkpoint MODEL --image IMAGE "QUESTION"` gives for that model
when its decoding is greedy (the quickstart's is). Nothing here imports minigpt4: the model loads as plain
`Blip2ForConditionalGeneration` (strictly: a missing, unexpected or mis-shaped tensor stops the script), and the
input recipe (MiniGPT-4's prompt, with the image tokens in its middle) is the Python block of the folder's model
card, README.md, which the export wrote for this model. That block is run as code, so use folders you trust.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration


def card_recipe(folder: Path) -> dict:
    """The model card's Python block, run: its `PROMPT`, `build_inputs` and `answer`."""
    card = folder / "README.md"
    block = re.search(r"```python\n(.*?)```", card.read_text(), re.S)
    if block is None:
        raise SystemExit(f"{card} has no Python block: not a folder written by `minigpt4 export`")
    namespace: dict = {"__name__": "model_card"}
    exec(compile(block.group(1), str(card), "exec"), namespace)
    return namespace


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    folder, image, question = Path(argv[0]), Path(argv[1]), argv[2]
    model, report = Blip2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    problems = {kind: keys for kind, keys in report.items() if keys}
    if problems:
        raise SystemExit(f"{folder} does not load cleanly as Blip2ForConditionalGeneration: {problems}")
    processor = AutoProcessor.from_pretrained(folder, backend="pil")  # MiniGPT-4 resizes with PIL
    recipe = card_recipe(folder)
    print(recipe["answer"](model.eval(), processor, Image.open(image), question, do_sample=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
