"""`python -m mllm_edge.testing OUT_DIR [NAME]`: write a tiny random LLaVA checkpoint and a sample image.

For trying the toolchain on a machine without real weights. The answers of a random model are noise.
"""

import sys
from pathlib import Path

from .checkpoints import FIXTURE_SPECS, make_tiny_llava, sample_image


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or argv[0].startswith("-"):
        print(f"usage: python -m mllm_edge.testing OUT_DIR [{'|'.join(FIXTURE_SPECS)}]", file=sys.stderr)
        return 2
    name = argv[1] if len(argv) == 2 else "llama_mha"
    if name not in FIXTURE_SPECS:
        print(f"error: unknown checkpoint '{name}' (choose from {', '.join(FIXTURE_SPECS)})", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        print(f"error: {folder} exists and is not an empty folder: give a new one", file=sys.stderr)
        return 1
    out = make_tiny_llava(folder, FIXTURE_SPECS[name])
    sample_image().save(out / "sample.png")
    print(f"wrote {name} to {out} (sample image: {out / 'sample.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
