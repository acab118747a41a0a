"""The Phi family as data: each published model's config facts, special tokens, chat template and stops.

Every layer asks the model's own config and tokenizer; this module says what the published models are, so
that (a) the estimator works offline for any of them, (b) the tiny test models of each shape are built from
the real fields, and (c) a model we do not support is refused with one message naming what is supported.

All the supported models are ``model_type: phi3`` (``Phi3ForCausalLM``). They come in three tokenizer families:

* **phi3**: Phi-3-mini-4k / -128k, Phi-3.5-mini, Phi-3-medium-4k / -128k. SentencePiece BPE, 32,064 rows,
  ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``; the role tokens swallow the whitespace after them (rstrip).
* **phi4-mini**: Phi-4-mini-instruct. o200k-based byte-level BPE, 200,064 rows,
  ``<|user|>...<|end|><|assistant|>`` with no newlines; bos = eos = pad = ``<|endoftext|>`` (199999).
* **phi4**: Phi-4 (14B), Phi-4-reasoning(-plus). cl100k-based byte-level BPE, 100,352 rows,
  ``<|im_start|>ROLE<|im_sep|>...<|im_end|>`` with the role as plain text; eos = ``<|im_end|>`` (100265), which closes
  every turn, pad = ``<|dummy_85|>`` (100349). Phi-4-mini-reasoning is a phi4-mini model.

The token *texts* that matter for training (``<|assistant|>``, ``<|end|>``, ``<|endoftext|>``) are the same in
the first two (Phi-4 has its own: ``end_token``, and the reply header the template renders); their ids are not, so
code asks the tokenizer for ids (``tokenizer.convert_tokens_to_ids``), never a constant. Sources: each model's
published config.json / tokenizer_config.json (the numbers below); docs/pitfalls.md says which of these differences
trip tools up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_phi3.errors import UserError

__all__ = ["FAMILIES", "PHI3", "PHI4", "PHI4_MINI", "PHI4_MINI_REASONING_SYSTEM_PROMPT", "PHI4_REASONING_SYSTEM_PROMPT",
           "PUBLISHED", "THINK_TOKENS", "TokenizerFamily", "PublishedModel",
           "check_supported", "family_for_config", "family_for_tokenizer", "published", "supported_summary"]


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
    # The token that closes every turn: the reply's last labelled token, and what generation stops at first.
    end_token: str = "<|end|>"
    # "module:function" writing the family's tokenizer files into a directory (tiny models, tests); "" when the
    # family's tokenizer ships as files (Phi-3's, in assets/tiny-phi3).
    tokenizer_writer: str = ""
    # How the template opens a turn ({role}: 'assistant', ...), for templates written in other languages (Ollama).
    role_header: str = "<|{role}|>"
    # The name llama.cpp gives the pre-tokenizer (its converter finds it from the ids of a probe text).
    llama_cpp_pre: str = "default"
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
    tokenizer_writer="qlora_phi3.model.o200k:write_phi4_mini_tokenizer", llama_cpp_pre="gpt-4o",
)

# microsoft/phi-4's tokenizer_config.json chat template, verbatim: the role is plain text between <|im_start|> and
# <|im_sep|>, no newlines, no eos after the last turn. Sources that agree character for character: llama.cpp's
# LLM_CHAT_TEMPLATE_PHI_4 (src/llama-chat.cpp, llama-cpp-python 0.3.36 sdist) renders the same string; the template
# itself is quoted from microsoft/phi-4 in public code (e.g. a Swift test citing huggingface.co/microsoft/phi-4-gguf,
# and TRL-based trainers that patch it with {% generation %} markers).
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def _phi4_special_ids() -> dict:
    """Phi-4's 96 added tokens, ids 100256-100351: cl100k_base's own specials (<|endoftext|> 100257, the FIM
    tokens, <|endofprompt|> 100276), the chat tokens 100264-100266, and <|dummy_0|>..<|dummy_87|> filling every
    other id in order. Sources: torchtune's models/phi4/_tokenizer.py (PHI4_SPECIAL_TOKENS: the named ids,
    <|dummy_0|> 100256, <|dummy_87|> 100351) and Microsoft.ML.Tokenizers' Phi-4 table and test
    (<|im_start|> 100264, <|im_sep|> 100266, <|im_end|> 100265, <|dummy_85|> 100349). 88 dummies fill the 88 free
    ids exactly, so the order fixes each one."""
    named = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
             "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276}
    free = [i for i in range(100256, 100352) if i not in named.values()]
    return {**named, **{f"<|dummy_{n}|>": i for n, i in enumerate(free)}}


PHI4 = TokenizerFamily(
    name="phi4", tokenizer_kind="byte_bpe", vocab_size=100352, special_ids=_phi4_special_ids(),
    chat_template=PHI4_CHAT_TEMPLATE,
    # microsoft/phi-4's tokenizer_config.json (as updated after release): eos <|im_end|> (100265), which closes
    # every turn, bos <|endoftext|>, pad <|dummy_85|> (100349), an untrained filler, so pad never equals eos.
    pad_token="<|dummy_85|>", bos_token="<|endoftext|>", eos_token="<|im_end|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"), role_newline=False, end_token="<|im_end|>",
    tokenizer_writer="qlora_phi3.model.cl100k:write_phi4_tokenizer", role_header="<|im_start|>{role}<|im_sep|>",
    llama_cpp_pre="dbrx",  # cl100k_base's split: llama.cpp names it after DBRX, the first cl100k model it converted
    title="Phi-4",
    # microsoft/phi-4's generation_config.json stops at <|im_end|> (and <|endoftext|>, as the stops above).
    generation_eos=("<|im_end|>", "<|endoftext|>"), generation_pad="<|dummy_85|>",
)

# The reasoning models' think block, written by the model inside its reply (data/encode.py: it carries loss).
# Phi-4-reasoning's tokenizer has them as added tokens; in the other tokenizers they are plain text.
THINK_TOKENS = ("<think>", "</think>")

# Every tokenizer family, by name: the lookups below read this table, so a family is one entry. The first is the
# default: a phi3 model whose vocabulary matches no entry (a Phi-3 with added tokens) is a Phi-3.
FAMILIES = {f.name: f for f in (PHI3, PHI4_MINI, PHI4)}
_DEFAULT_FAMILY = next(iter(FAMILIES.values()))


# The reasoning models' own chat templates, as package assets (assets/chat_templates/), each with its source:
# - phi4_mini_reasoning.jinja: microsoft/Phi-4-mini-reasoning's chat_template.jinja, byte for byte as Microsoft's
#   onnxruntime-extensions keeps it (test/data/phi-4-mini-reasoning/chat_template.jinja, commit f936ba4be191); a second
#   copy (a project quoting unsloth/Phi-4-mini-reasoning's template verbatim) is the same text. It always opens with
#   its fixed system prompt; a system message's content follows it after one space.
# - phi4_reasoning.jinja: microsoft/Phi-4-reasoning's template as its conversion to GGUF for Ollama's library
#   (phi4-reasoning:14b, May 2025) carries it in tokenizer.chat_template, which huggingface.js records verbatim
#   (packages/ollama-utils/src/chat-template-automap.ts, commit fe42e68017ff; the same file's phi4-mini-reasoning entry
#   is the template above, character for character). A second copy, modified (a switch to leave the system prompt
#   out and a system branch added), keeps the rest. Its system prompt equals litgpt's Phi4Reasoning default
#   (litgpt/prompts.py, commit 26857050fe3f). It writes its fixed system prompt, the user and assistant turns
#   (the reply inside {% generation %}), and ignores system messages. Another copy in circulation (unsloth's,
#   tests/data/published/) differs: docs/models.md.
_TEMPLATE_ASSETS = "assets/chat_templates"
PHI4_REASONING_SYSTEM_PROMPT = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant involves thoroughly "
    "exploring questions through a systematic thinking process before providing the final precise and accurate "
    "solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, "
    "reflection, backtracing, and iteration to develop well-considered thinking process. Please structure your "
    "response into two main sections: Thought and Solution using the specified format: <think> {Thought section} "
    "</think> {Solution section}. In the Thought section, detail your reasoning process in steps. Each step should "
    "include detailed considerations such as analysing questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and revisiting previous steps. In the "
    "Solution section, based on various attempts, explorations, and reflections from the Thought section, "
    "systematically present the final solution that you deem correct. The Solution section should be logical, "
    "accurate, and concise and detail necessary steps needed to reach the conclusion. Now, try to solve the following "
    "question through the above guidelines:")
PHI4_MINI_REASONING_SYSTEM_PROMPT = "Your name is Phi, an AI math expert developed by Microsoft."


@dataclass(frozen=True)
class PublishedModel:
    """A published model: its Hub id, the revision our recipes pin, its tokenizer family and the config.json
    facts the estimator and the tiny builders need offline."""
    hub_id: str
    revision: str | None  # None: no offline source for its commit; recipes leave it unpinned and say so
    family: TokenizerFamily
    config: dict = field(default_factory=dict)
    note: str = ""
    # The model's own chat template where it is not its family's: a file under assets/chat_templates/ ("" = the
    # family's), and the fixed system prompt that template writes.
    template_asset: str = ""
    system_prompt: str = ""

    @property
    def chat_template(self) -> str:
        """The model's published chat template (its own asset, else its tokenizer family's)."""
        return _template_asset(self.template_asset) if self.template_asset else self.family.chat_template

    @property
    def head_dim(self) -> int:
        return self.config["hidden_size"] // self.config["num_attention_heads"]

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.config.get("partial_rotary_factor", 1.0))


def _template_asset(name: str) -> str:
    from importlib.resources import files

    return files("qlora_phi3").joinpath(_TEMPLATE_ASSETS, name).read_text(encoding="utf-8")


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
# microsoft/Phi-4-mini-instruct's config.json (its rope_scaling lists are above).
_PHI4_MINI_CONFIG = dict(_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True,
                         partial_rotary_factor=0.75, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
                         original_max_position_embeddings=4096)
# microsoft/phi-4's config.json: Phi-3-medium's layer shapes, the 100,352-row vocabulary, 16k positions without
# rope scaling (rope_theta 250,000), no sliding window. Every one of these fields equals the one verbatim copy of the
# file found (as first released, transformers 4.47.0, quoted in a public note; docs/models.md). That copy says eos =
# pad = 100257, as the first release's tokenizer did; the updated tokenizer_config.json (Microsoft's copy in
# onnxruntime-extensions, tests/data/published/) has eos <|im_end|> 100265 and pad <|dummy_85|> 100349, which we use.
# Phi-4-reasoning(-plus): 32k positions, rope_theta 500,000 and those ids, as Microsoft's Phi-4-reasoning-vision-15B
# config.json has them for its Phi-4-shaped language model (its own config.json was not found).
_PHI4_CONFIG = dict(_MEDIUM, vocab_size=100352, rope_theta=250000.0, max_position_embeddings=16384,
                    original_max_position_embeddings=16384, sliding_window=None, rope_scaling=None,
                    bos_token_id=100257, eos_token_id=100265, pad_token_id=100349)
_PHI4_REASONING_CONTEXT = dict(max_position_embeddings=32768, original_max_position_embeddings=32768,
                               rope_theta=500000.0)
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
                   dict(_PHI4_MINI_CONFIG, **_LONG_128K, long_factor=PHI4_MINI_LONG_FACTOR,
                        short_factor=PHI4_MINI_SHORT_FACTOR),
                   note="grouped-query attention (24/8, head dim 128), rotary on 96 of 128 dims, tied embeddings"),
    # A Phi-4-mini fine-tune for maths: the same architecture, config and tokenizer (its published
    # tokenizer_config.json has Phi-4-mini's added tokens; its config.json was not found). Its own chat template.
    PublishedModel("microsoft/Phi-4-mini-reasoning", None, PHI4_MINI,
                   dict(_PHI4_MINI_CONFIG, **_LONG_128K, long_factor=PHI4_MINI_LONG_FACTOR,
                        short_factor=PHI4_MINI_SHORT_FACTOR),
                   note="Phi-4-mini-instruct's architecture and tokenizer; writes <think>...</think> before answering",
                   template_asset="phi4_mini_reasoning.jinja", system_prompt=PHI4_MINI_REASONING_SYSTEM_PROMPT),
    PublishedModel("microsoft/phi-4", None, PHI4, dict(_PHI4_CONFIG),
                   note="Phi-3-medium's layout (40 layers, 40/10 heads, hidden 5120), full rotary, untied, 16k "
                        "context"),
    PublishedModel("microsoft/Phi-4-reasoning", None, PHI4, dict(_PHI4_CONFIG, **_PHI4_REASONING_CONTEXT),
                   note="Phi-4 fine-tuned to write <think>...</think> before answering; 32k context",
                   template_asset="phi4_reasoning.jinja", system_prompt=PHI4_REASONING_SYSTEM_PROMPT),
    PublishedModel("microsoft/Phi-4-reasoning-plus", None, PHI4, dict(_PHI4_CONFIG, **_PHI4_REASONING_CONTEXT),
                   note="Phi-4-reasoning with further reinforcement learning; same architecture and template",
                   template_asset="phi4_reasoning.jinja", system_prompt=PHI4_REASONING_SYSTEM_PROMPT),
)}

# Models people try that are not this architecture or tokenizer family, with why and what to use instead (matched on
# the Hub id, in this order).
_FLASH = ("Phi-4-mini-flash-reasoning is another architecture (SambaY, model_type 'phi4flash': Mamba layers, "
          "sliding-window attention and gated memory units) that needs trust_remote_code and that llama.cpp cannot "
          "run; use microsoft/Phi-4-mini-reasoning (the same maths fine-tune on Phi-4-mini's phi3 architecture) "
          "instead")
_MULTIMODAL = ("Phi-4-multimodal is a vision/speech model (Phi4MMForCausalLM, model_type 'phi4mm': image and audio "
               "encoders with their own LoRA adapters, remote code); for text use microsoft/Phi-4-mini-instruct, "
               "its language model")
_REFUSED_IDS = {
    "phi-3-small": "Phi-3-small is another architecture (Phi3SmallForCausalLM: block-sparse attention, tiktoken "
                   "cl100k vocabulary) that needs trust_remote_code",
    "phi-4-mini-flash": _FLASH,
    "phi-4-multimodal": _MULTIMODAL,
    "vision": "vision models (Phi-3-vision, Phi-3.5-vision: phi3_v) take images through a separate encoder",
    "phi-3.5-moe": "Phi-3.5-MoE is a mixture-of-experts architecture (phimoe)",
}
# config.json model_type values of the same.
_REFUSED_TYPES = {"phi3small": _REFUSED_IDS["phi-3-small"], "phi3_v": _REFUSED_IDS["vision"],
                  "phi4mm": _MULTIMODAL, "phi4_multimodal": _MULTIMODAL, "phi4flash": _FLASH, "phi4_flash": _FLASH,
                  "phimoe": _REFUSED_IDS["phi-3.5-moe"]}
# config.json architectures of the same (a renamed model_type still says its class).
_REFUSED_ARCHS = {"Phi4FlashForCausalLM": _FLASH, "Phi4MMForCausalLM": _MULTIMODAL,
                  "Phi4MultimodalForCausalLM": _MULTIMODAL}


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
        if model_type in _REFUSED_TYPES or arch in _REFUSED_ARCHS:
            why = _REFUSED_TYPES.get(model_type) or _REFUSED_ARCHS[arch]
        elif model_type != "phi3":
            why = f"its config.json says model_type {model_type!r}, not 'phi3'"
        elif arch not in (None, "Phi3ForCausalLM"):
            why = f"its config.json says architecture {arch!r}, not Phi3ForCausalLM"
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
    """The tokenizer family, from where the tokenizer puts the family's end-of-turn token (each family has its own
    id for it: <|end|> at 32007 or 200020, <|im_end|> at 100265)."""
    return next((f for f in FAMILIES.values()
                 if tokenizer.convert_tokens_to_ids(f.end_token) == f.token_id(f.end_token)), _DEFAULT_FAMILY)
