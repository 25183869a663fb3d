"""Some of a model's layers (the first and the last, the middle dropped: the layers the
layer_skip self-draft runs) and its head, written as a HuggingFace folder: a draft model for
speculative decoding that shares the target's vocabulary when no smaller model of its family is
at hand (the default model is the smallest SmolLM2).

    python -m thrifty.model.truncate SRC DST --num-layers 8

SRC is anything `thrifty serve --model` takes (a HF folder, a .gguf file; none: the default
model); DST gets config.json, model.safetensors (float, dequantized) and the tokenizer. Unlike
the layer_skip self-draft, such a draft keeps its own copy of the weights and its own KV cache.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from thrifty.config import skip_middle_layers
from thrifty.model.loader import load_hf_config, load_tokenizer, read_safetensors, resolve_model

_LAYER = re.compile(r"^(model\.)?layers\.(\d+)\.")


def truncate_model(src: str | None, dst: str, num_layers: int) -> Path:
    source = resolve_model(src)
    if source.kind == "gguf":
        from thrifty.model.gguf_loader import load_gguf_weights

        hf_config, weights, _ = load_gguf_weights(source.path, keep_quantized=False)
    elif source.kind == "hf":
        hf_config, weights = load_hf_config(source), read_safetensors(Path(source.path))
    else:
        raise ValueError("truncate: dummy models have no weights to keep")
    total = hf_config["num_hidden_layers"]
    if not 1 <= num_layers < total:
        raise ValueError(f"truncate: num_layers must be in [1, {total - 1}] for a {total}-layer model, "
                         f"got {num_layers}")
    renumber = {old: new for new, old in enumerate(skip_middle_layers(num_layers, total))}
    kept = {}
    for name, tensor in weights.items():
        m = _LAYER.match(name)
        if m is None:
            kept[name] = tensor
        elif int(m.group(2)) in renumber:
            kept[f"{m.group(1) or ''}layers.{renumber[int(m.group(2))]}.{name[m.end():]}"] = tensor
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.to(torch.float32).contiguous() for k, v in kept.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": num_layers}, indent=2))
    load_tokenizer(source).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thrifty.model.truncate", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", default=None, help="the model (default: the default model)")
    parser.add_argument("dst", help="the folder to write")
    parser.add_argument("--num-layers", type=int, required=True, help="how many layers to keep")
    args = parser.parse_args(argv)
    print(truncate_model(args.src, args.dst, args.num_layers))


if __name__ == "__main__":
    main()
