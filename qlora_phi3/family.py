"""The Phi family as data: each published model's config facts, special tokens, chat template and stops.

Every layer asks the model's own config and tokenizer; this module says what the published models are, so
that (a) the estimator works offline for any of them, (b) the tiny test models of each shape are built from
the real fields, and (c) a model we do not support is refused with one message naming what is supported.

All the supported models are ``model_type: phi3`` (``Phi3ForCausalLM``). They come in two tokenizer families:

* **phi3**: Phi-3-mini-4k / -128k, Phi-3.5-mini, Phi-3-medium-4k / -128k. SentencePiece BPE, 32,064 rows,
  ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``; the role tokens swallow the whitespace after them (rstrip).
* **phi4-mini**: Phi-4-mini-instruct. o200k-based byte-level BPE, 200,064 rows,
  ``<|user|>...<|end|><|assistant|>`` with no newlines; bos = eos = pad = ``<|endoftext|>`` (199999).

The token *texts* that matter for training (``<|assistant|>``, ``<|end|>``, ``<|endoftext|>``) are the same in
both; their ids are not, so code asks the tokenizer for ids (``tokenizer.convert_tokens_to_ids``), never a
constant. Sources: each model's published config.json / tokenizer_config.json (the numbers below); docs/pitfalls.md
says which of these differences trip tools up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_phi3.errors import UserError

__all__ = ["FAMILIES", "PHI3", "PHI4_MINI", "PUBLISHED", "TokenizerFamily", "PublishedModel", "check_supported",
           "family_for_config", "family_for_tokenizer", "published", "supported_summary"]


@dataclass(frozen=True)
class TokenizerFamily:
    """What a tokenizer family fixes: vocabulary rows, special tokens and ids, template, pad and stops."""
    name: str
    tokenizer_kind: str  # "sentencepiece" (Llama-2 style, byte fallback) or "byte_bpe" (GPT-2 style, o200k)
    vocab_size: int  # embedding rows (config.json vocab_size), padded beyond the tokenizer's tokens
    special_ids: dict  # token text -> id, as the published tokenizer has them
    chat_template: str  # the published tokenizer_config.json chat template, verbatim
    pad_token: str  # what training pads with (never a token that carries loss)
    bos_token: str
    eos_token: str
    # Generation stops at any of these (their ids come from the tokenizer): <|end|> closes every turn.
    stop_tokens: tuple = ("<|end|>", "<|endoftext|>")
    role_newline: bool = True  # the template writes '\n' after each role token
    title: str = ""  # how people name the family's models, for messages
    # The published generation_config.json's eos and pad tokens (its bos is bos_token).
    generation_eos: tuple = ()
    generation_pad: str = ""

    def token_id(self, text: str) -> int:
        return self.special_ids[text]


# microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json chat template, verbatim (same in every phi3-family model).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/Phi-4-mini-instruct's tokenizer_config.json chat template: '<|role|>' + content + '<|end|>' with no
# newlines; a system message with tools carries them between <|tool|> and <|/tool|>.
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI3 = TokenizerFamily(
    name="phi3", tokenizer_kind="sentencepiece", vocab_size=32064,
    special_ids={"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
                 "<|placeholder1|>": 32002, "<|placeholder2|>": 32003, "<|placeholder3|>": 32004,
                 "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007, "<|placeholder5|>": 32008,
                 "<|placeholder6|>": 32009, "<|user|>": 32010},
    chat_template=PHI3_CHAT_TEMPLATE,
    # Phi-3's config says pad = eos (32000), but eos ends every rendered conversation: padding with it would hide
    # the end from anything that masks pads. <unk> never occurs in text.
    pad_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", title="Phi-3",
    generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), generation_pad="<|endoftext|>",
)

PHI4_MINI = TokenizerFamily(
    name="phi4-mini", tokenizer_kind="byte_bpe", vocab_size=200064,
    # o200k_base keeps <|endoftext|> 199999 and <|endofprompt|> 200018; Phi-4-mini adds the chat and tool tokens.
    special_ids={"<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
                 "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024,
                 "<|tool_call|>": 200025, "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028},
    chat_template=PHI4_MINI_CHAT_TEMPLATE,
    # Its own config: pad = eos = bos = 199999, and the tokenizer has no other unused token. Safe here: labels come
    # from the token walk (data/encode.py), the collator pads labels with -100 rather than masking pad ids, and
    # the token that carries the turn's end in the loss is <|end|> (200020), not <|endoftext|>.
    pad_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
    role_newline=False, title="Phi-4-mini",
    generation_eos=("<|endoftext|>", "<|end|>"), generation_pad="<|endoftext|>",
)

# Every tokenizer family, by name: the lookups below read this table, so a family is one entry. The first is the
# default: a phi3 model whose vocabulary matches no entry (a Phi-3 with added tokens) is a Phi-3.
FAMILIES = {f.name: f for f in (PHI3, PHI4_MINI)}
_DEFAULT_FAMILY = next(iter(FAMILIES.values()))


@dataclass(frozen=True)
class PublishedModel:
    """A published model: its Hub id, the revision our recipes pin, its tokenizer family and the config.json
    facts the estimator and the tiny builders need offline."""
    hub_id: str
    revision: str | None  # None: no offline source for its commit; recipes leave it unpinned and say so
    family: TokenizerFamily
    config: dict = field(default_factory=dict)
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.config["hidden_size"] // self.config["num_attention_heads"]

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.config.get("partial_rotary_factor", 1.0))


# Fields shared by every phi3-architecture config.json (only the sizes, context and rope differ).
_COMMON = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-05,
               rope_theta=10000.0, attention_bias=False)
_MINI = dict(_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
             pad_token_id=32000, original_max_position_embeddings=4096)
_MEDIUM = dict(_MINI, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10)
# microsoft/Phi-4-mini-instruct config.json rope_scaling (longrope over the 48 rotary pairs of its 96 rotary dims).
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
PHI4_MINI_SHORT_FACTOR = [1.0] * 48
# microsoft/Phi-3.5-mini-instruct config.json rope_scaling (longrope over the 48 pairs of its head dim 96),
# verbatim from two independent copies of that config.json. Phi-3-mini-128k-instruct has the same architecture and
# layout but its own lists, which we could not reach offline: its tiny models use these.
PHI35_MINI_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_MINI_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
_SHORT_4K = dict(max_position_embeddings=4096, sliding_window=2047, rope_scaling=None)
_LONG_128K = dict(max_position_embeddings=131072, sliding_window=262144, rope_type="longrope")

PUBLISHED = {m.hub_id: m for m in (
    PublishedModel("microsoft/Phi-3-mini-4k-instruct", "0a67737cc96d2554230f90338b163bc6380a2a85", PHI3,
                   dict(_MINI, **_SHORT_4K)),
    PublishedModel("microsoft/Phi-3-mini-128k-instruct", None, PHI3, dict(_MINI, **_LONG_128K)),
    PublishedModel("microsoft/Phi-3.5-mini-instruct", "2fe192450127e6a83f7441aef6e3ca586c338b77", PHI3,
                   dict(_MINI, **_LONG_128K, long_factor=PHI35_MINI_LONG_FACTOR, short_factor=PHI35_MINI_SHORT_FACTOR),
                   note="the Phi-3-mini-128k architecture and tokenizer, retrained, with its own longrope factors"),
    PublishedModel("microsoft/Phi-3-medium-4k-instruct", None, PHI3, dict(_MEDIUM, **_SHORT_4K)),
    PublishedModel("microsoft/Phi-3-medium-128k-instruct", None, PHI3, dict(_MEDIUM, **_LONG_128K)),
    PublishedModel("microsoft/Phi-4-mini-instruct", "cfbefacb99257ffa30c83adab238a50856ac3083", PHI4_MINI,
                   dict(_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=24, num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True,
                        partial_rotary_factor=0.75, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
                        original_max_position_embeddings=4096, **_LONG_128K,
                        long_factor=PHI4_MINI_LONG_FACTOR, short_factor=PHI4_MINI_SHORT_FACTOR),
                   note="grouped-query attention (24/8, head dim 128), rotary on 96 of 128 dims, tied embeddings"),
)}

# Models people try that are not this architecture or tokenizer family, with why (matched on the Hub id).
_REFUSED_IDS = {
    "phi-3-small": "Phi-3-small is another architecture (Phi3SmallForCausalLM: block-sparse attention, tiktoken "
                   "cl100k vocabulary) that needs trust_remote_code",
    "phi-4-multimodal": "Phi-4-multimodal is a vision/speech model (phi4mm)",
    "vision": "vision models (Phi-3-vision, Phi-3.5-vision: phi3_v) take images through a separate encoder",
    "phi-3.5-moe": "Phi-3.5-MoE is a mixture-of-experts architecture (phimoe)",
    "phi-4-reasoning": "Phi-4-reasoning is the 14B Phi-4 (100,352-token tokenizer family)",
    "phi-4": "Phi-4 (14B) uses another tokenizer family (100,352 rows, cl100k-based) and chat format "
             "(<|im_start|>...<|im_sep|>)",
}
# config.json model_type values of the same.
_REFUSED_TYPES = {"phi3small": _REFUSED_IDS["phi-3-small"], "phi3_v": _REFUSED_IDS["vision"],
                  "phi4mm": _REFUSED_IDS["phi-4-multimodal"], "phi4_multimodal": _REFUSED_IDS["phi-4-multimodal"],
                  "phimoe": _REFUSED_IDS["phi-3.5-moe"]}


def supported_summary() -> str:
    tokenizers = " or ".join(f"{f.title} ({f.vocab_size:,})" for f in FAMILIES.values())
    return (f"qlora-phi3 supports Phi3ForCausalLM models with the {tokenizers} tokenizer: "
            + ", ".join(PUBLISHED) + " (docs/models.md)")


def published(name: str) -> PublishedModel | None:
    """The published model with this Hub id (case-insensitive), or None."""
    low = name.strip().lower()
    return next((m for hub, m in PUBLISHED.items() if hub.lower() == low), None)


def _refusal_for_id(name: str) -> str | None:
    low = name.lower().rsplit("/", 1)[-1]
    if published(name):
        return None
    for key, why in _REFUSED_IDS.items():
        if key == "phi-4" and not (low == "phi-4" or low.startswith("phi-4-") and "mini" not in low):
            continue
        if key in low:
            return why
    return None


def check_supported(name: str, config=None) -> None:
    """Refuse, with one message naming what is supported, a model that is not a supported Phi: by Hub id before
    anything is read, and by its config (``model_type``, architecture, vocabulary) once it is."""
    why = _refusal_for_id(name)
    if why is None and config is not None:
        model_type = getattr(config, "model_type", None)
        arch = (getattr(config, "architectures", None) or [None])[0]
        vocab = getattr(config, "vocab_size", None)
        if model_type in _REFUSED_TYPES:
            why = _REFUSED_TYPES[model_type]
        elif model_type != "phi3":
            why = f"its config.json says model_type {model_type!r}, not 'phi3'"
        elif arch not in (None, "Phi3ForCausalLM"):
            why = f"its config.json says architecture {arch!r}, not Phi3ForCausalLM"
        elif vocab == 100352:
            why = _REFUSED_IDS["phi-4"]
        # Another vocabulary size is not refused: a Phi-3 with added tokens (resized embeddings) is still a Phi-3;
        # its tokenizer must carry the chat tokens, which load_tokenizer checks.
    if why:
        raise UserError(f"model.name_or_path={name!r}: not supported: {why}. {supported_summary()}.")


def family_for_config(config) -> TokenizerFamily:
    """The tokenizer family of a phi3 model, from its config's vocabulary size (the default family when none has
    that size)."""
    vocab = getattr(config, "vocab_size", None) if not isinstance(config, dict) else config.get("vocab_size")
    return next((f for f in FAMILIES.values() if f.vocab_size == vocab), _DEFAULT_FAMILY)


def family_for_tokenizer(tokenizer) -> TokenizerFamily:
    """The tokenizer family, from where the tokenizer puts ``<|end|>`` (each family has its own id for it)."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    return next((f for f in FAMILIES.values() if f.token_id("<|end|>") == end), _DEFAULT_FAMILY)
