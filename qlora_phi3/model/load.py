"""Loading Phi-3 for QLoRA: device, compute dtype and attention choice, 4-bit NF4 base, tokenizer.

The embedded tiny model and the real ``microsoft/Phi-3-mini-*`` go through the same
``from_pretrained`` calls here; only the path differs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.config import EMBEDDED_MODEL, ModelConfig
from qlora_phi3.errors import UserError
from qlora_phi3.family import check_supported, family_for_tokenizer, published
from qlora_phi3.hub import ensure_hub_access
from qlora_phi3 import machine  # machine.cpu_bf16 is looked up per call: a name bound at import keeps a stale one

__all__ = ["Choice", "ModelSource", "auto_tokenizer", "load_model", "load_tokenizer", "pick_attention",
           "pick_compute_dtype", "pick_device", "resolve_model", "resolve_model_path", "read_model_config",
           "quantization_config", "has_native_bf16", "hide_load_progress_bars", "ships_tokenizer"]


@dataclass
class Choice:
    """A decision made on the user's behalf, with the reason printed next to it."""
    value: str
    reason: str


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == EMBEDDED_MODEL:
        from qlora_phi3.model.tiny import TINY_MODEL_DIR

        return str(TINY_MODEL_DIR)
    return name_or_path


@dataclass(frozen=True)
class ModelSource:
    """A recipe's ``model`` resolved once (:func:`resolve_model`): ``path`` is what transformers reads (the embedded
    model's directory, a local directory or a Hub id), refused if not a supported Phi, and the Hub already asked
    about it. ``train``'s setup resolves it before anything loads and hands it to every later step, so none of them
    resolves the reference or asks the Hub again."""
    cfg: ModelConfig
    path: str

    @property
    def name_or_path(self) -> str:  # as a ModelConfig reads, for steps that take either
        return self.cfg.name_or_path

    @property
    def revision(self) -> str | None:
        return self.cfg.revision


def resolve_model(model: ModelConfig | ModelSource) -> ModelSource:
    """``model`` resolved: a Hub id that is not a supported Phi refused by its name, before anything is fetched;
    where its files are; and, for a Hub id, the Hub asked once (:func:`qlora_phi3.hub.ensure_hub_access`: offline
    and not cached is one error with the download command). One already resolved is returned as it is."""
    if isinstance(model, ModelSource):
        return model
    check_supported(model.name_or_path)
    path = resolve_model_path(model.name_or_path)
    ensure_hub_access(path, model.revision, "model.name_or_path")
    return ModelSource(model, path)


def pick_device(requested: str = "auto") -> Choice:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible to PyTorch (check the driver, "
                        "CUDA_VISIBLE_DEVICES, or that a CUDA build of torch is installed); use train.device=auto.")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return Choice("cpu", "no CUDA GPU visible" if requested == "auto" else "train.device=cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))  # one device per process under accelerate/torchrun
    return Choice(f"cuda:{index}", torch.cuda.get_device_name(index))


def has_native_bf16(device: str) -> bool:
    """Whether a CUDA device computes in bf16 natively (Ampere, compute capability 8.0, or newer).

    Not ``torch.cuda.is_bf16_supported()``: it returns True on Turing and Volta too, where bf16 is emulated
    (slow, and flash-attn refuses it), so the fp16 fallback would never trigger on a T4 or an RTX 20xx."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def pick_compute_dtype(requested: str, device: str) -> Choice:
    """The compute dtype, decided by what the device does natively: bf16 where it is native (Ampere+ GPUs;
    CPUs with AVX512-BF16, AMX or ARM BF16), else fp16 with loss scaling on GPUs and fp32 on CPUs (a CPU
    has no fast fp16 either)."""
    if requested != "auto":
        if requested == "bfloat16" and device.startswith("cuda") and not has_native_bf16(device):
            import torch

            raise UserError(f"model.compute_dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no native bf16 "
                            "(pre-Ampere, compute capability < 8.0); use model.compute_dtype=float16 or auto.")
        if requested == "bfloat16" and device == "cpu" and not machine.cpu_bf16()[0]:
            return Choice(requested, "model.compute_dtype; this CPU has no native bf16, so it is emulated and about "
                                     "10x slower than model.compute_dtype=auto (fp32)")
        return Choice(requested, "model.compute_dtype")
    if device == "cpu":
        native, why = machine.cpu_bf16()
        return Choice("bfloat16" if native else "float32", why)
    if has_native_bf16(device):
        return Choice("bfloat16", "GPU has native bf16 (Ampere or newer)")
    return Choice("float16", "GPU lacks native bf16 (pre-Ampere): fp16 compute with loss scaling, fp32 adapter weights")


def pick_attention(requested: str, device: str) -> Choice:
    import torch

    has_flash = importlib.util.find_spec("flash_attn") is not None
    on_gpu = device.startswith("cuda")
    ampere = on_gpu and torch.cuda.get_device_capability(device)[0] >= 8
    if requested == "flash_attention_2":
        if not has_flash:
            raise UserError("model.attn_implementation=flash_attention_2 but flash-attn is not installed; "
                            "pip install 'qlora-phi3[flash]' or use model.attn_implementation=auto.")
        if not ampere:
            raise UserError("model.attn_implementation=flash_attention_2 needs an Ampere or newer GPU; "
                            "use model.attn_implementation=auto (sdpa).")
        return Choice(requested, "model.attn_implementation")
    if requested != "auto":
        return Choice(requested, "model.attn_implementation")
    if has_flash and ampere:
        return Choice("flash_attention_2", "flash-attn installed and GPU is Ampere or newer")
    if not on_gpu:
        return Choice("sdpa", "CPU: flash-attn needs a CUDA GPU")
    if not has_flash:
        return Choice("sdpa", "flash-attn not installed (pip install 'qlora-phi3[flash]')")
    return Choice("sdpa", "GPU older than Ampere: flash-attn 2 unsupported")


def read_model_config(model: ModelConfig | ModelSource):
    """The model's ``config.json`` only (no weights): for validation and estimates."""
    from transformers import AutoConfig

    source = resolve_model(model)
    cfg, path = source.cfg, source.path
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(_not_found(cfg, e)) from None
    except ValueError as e:
        check_supported(cfg.name_or_path, _raw_config(path))  # an architecture transformers does not know
        raise UserError(f"model.name_or_path={cfg.name_or_path!r}: cannot read its config: {e}") from None
    check_supported(cfg.name_or_path, config)
    return config


def _raw_config(path: str):
    """config.json of a local directory as a plain namespace (for the refusal message), or None."""
    import json
    from types import SimpleNamespace

    try:
        return SimpleNamespace(**json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _not_found(cfg: ModelConfig, err: Exception) -> str:
    if Path(cfg.name_or_path).expanduser().exists() or cfg.name_or_path.startswith((".", "/", "~")):
        return (f"model.name_or_path={cfg.name_or_path!r}: not a model directory (needs config.json, "
                f"tokenizer and *.safetensors): {str(err).splitlines()[0]}")
    return (f"model.name_or_path={cfg.name_or_path!r}: not found locally and the Hub is unreachable or has no "
            f"such repo/revision. Download it once with `hf download {cfg.name_or_path}"
            f"{' --revision ' + cfg.revision if cfg.revision else ''}` on a connected machine, or point "
            f"model.name_or_path at a local directory. ({str(err).splitlines()[0]})")


def auto_tokenizer(path: str, **kwargs):
    """``AutoTokenizer.from_pretrained``, except for byte-level BPE Phis (Phi-4-mini): their tokenizer_config.json
    says ``GPT2Tokenizer``, and transformers 5's GPT2Tokenizer replaces the tokenizer.json pre-tokenizer (o200k's
    split regex) with GPT-2's, which tokenizes whitespace and digits differently from the published tokenizer
    (checked: llama.cpp's o200k probe hash, tests/unit/core/test_family.py). The generic fast class keeps tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if family_for_tokenizer(tok).tokenizer_kind == "byte_bpe" and not type(tok) is PreTrainedTokenizerFast:
        tok = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    return tok


# The Hub model whose tokenizer the package ships (assets/tiny-phi3, rebuilt by model/tokenizer.py and checked
# against its reference ids), at the revision the Phi-3-mini-4k recipes pin (family.PUBLISHED).
SHIPPED_TOKENIZER = "microsoft/Phi-3-mini-4k-instruct"


def ships_tokenizer(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` names the model and revision whose tokenizer ships with the package: `data` and `fit` need no
    Hub for it."""
    known = published(cfg.name_or_path)
    return known is not None and known.hub_id == SHIPPED_TOKENIZER and cfg.revision == known.revision


def load_tokenizer(model: ModelConfig | ModelSource, path: str | None = None):
    """The model's tokenizer set up for training: its family's pad token (never one that carries loss), right
    padding. Offline, with the model not in the cache, the tokenizer that ships with the package where it is this
    model's (:func:`ships_tokenizer`). ``path``: a directory with the tokenizer (an adapter's) instead."""
    if isinstance(model, ModelSource) and path is None:  # resolved, the Hub asked: it answered or has it cached
        return _set_up_tokenizer(model.cfg, model.path, model.cfg.revision)
    cfg = model.cfg if isinstance(model, ModelSource) else model
    path, revision = _tokenizer_source(cfg, path or resolve_model_path(cfg.name_or_path))
    return _set_up_tokenizer(cfg, path, revision)


def _tokenizer_source(cfg: ModelConfig, path: str) -> tuple[str, str | None]:
    """Where to read ``cfg``'s tokenizer from, at which revision: ``path``, or the shipped tokenizer when the Hub is
    out of reach and ``path`` is a Hub id that is not cached (:func:`ships_tokenizer`)."""
    revision = cfg.revision
    try:
        ensure_hub_access(path, cfg.revision, "model.name_or_path")
    except UserError:
        if not ships_tokenizer(cfg):
            raise
        from qlora_phi3.model.tiny import TINY_MODEL_DIR
        from qlora_phi3.ui import info

        path, revision = str(TINY_MODEL_DIR), None
        info(f"tokenizer: {cfg.name_or_path} at {cfg.revision[:7]} is not on this machine and the Hub is out of reach: "
             "using its tokenizer that ships with qlora-phi3 (the same vocabulary and chat template)")
    return path, revision


def _set_up_tokenizer(cfg: ModelConfig, path: str, revision: str | None):
    """The tokenizer at ``path``, checked for its family's chat tokens, with the family's pad token."""
    try:
        tok = auto_tokenizer(path, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(_not_found(cfg, e)) from None
    family = family_for_tokenizer(tok)  # Phi-3 unless the tokenizer has another family's end-of-turn token
    if tok.convert_tokens_to_ids(family.end_token) in (None, tok.unk_token_id):
        raise UserError(f"{cfg.name_or_path}: tokenizer has no {family.end_token} token; this is not a Phi-3, "
                        "Phi-4-mini or Phi-4 chat tokenizer.")
    if tok.convert_tokens_to_ids(family.pad_token) in (None, tok.unk_token_id) and family.pad_token != tok.unk_token:
        raise UserError(f"{cfg.name_or_path}: tokenizer has no {family.pad_token} token to pad with "
                        f"({family.name} pads with it).")
    # Phi-3: <unk>, never eos, which ends every rendered conversation. Phi-4-mini: <|endoftext|>, its own pad
    # (family.py says why that is safe there).
    tok.pad_token = family.pad_token
    tok.padding_side = "right"
    if not tok.chat_template:
        raise UserError(f"{cfg.name_or_path}: tokenizer has no chat template; Phi-3 tokenizers ship one.")
    return tok


def quantization_config(cfg: ModelConfig, compute_dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage),
    )


def load_model(model: ModelConfig | ModelSource, device: str, compute_dtype: str, attn_implementation: str):
    """The frozen 4-bit base model on ``device``; non-quantized weights in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_bitsandbytes()
    hide_load_progress_bars()
    source = resolve_model(model)
    cfg, path = source.cfg, source.path
    if cfg.trust_remote_code:
        from qlora_phi3.ui import warn

        warn("model.trust_remote_code=true: Python code from the model repository will run on this machine.")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            quantization_config=quantization_config(cfg, compute_dtype),
            dtype=getattr(torch, compute_dtype),
            device_map={"": device},
            attn_implementation=attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
        )
    except OSError as e:
        raise UserError(_not_found(cfg, e)) from None
    check_supported(cfg.name_or_path, model.config)
    _keep_cpu_4bit_format(model)
    # KV cache is useless in training and warns under checkpointing; set on the live config only.
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _keep_cpu_4bit_format(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster kernel the first time a
    layer runs in eval mode without grad, and converts them back when a state dict is taken. That inverse
    is lossy (it re-quantizes the nested absmax), so a base that was evaluated and then saved would no
    longer be bit-identical to the loaded one, and its logits would drift. We keep the one packed format."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _quiet_bitsandbytes() -> None:
    """bitsandbytes logs an optional-kernel miss on CPU at every load; it is noise to our users."""
    import logging

    for name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.cpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def hide_load_progress_bars() -> None:
    """transformers draws a tqdm bar per model load ("Loading weights"); our commands show their own display."""
    from transformers.utils import logging

    logging.disable_progress_bar()
