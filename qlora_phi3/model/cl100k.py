"""Phi-4's tokenizer, rebuilt offline from the real cl100k_base vocabulary.

Phi-4 (14B, and Phi-4-reasoning / -plus) tokenizes with OpenAI's cl100k_base byte-level BPE (ids 0-100,255) plus 96
added tokens at 100,256-100,351 (family.PHI4: cl100k's own <|endoftext|>, FIM and <|endofprompt|>, the chat tokens
<|im_start|> <|im_end|> <|im_sep|>, and <|dummy_0|>..<|dummy_87|>), in 100,352 embedding rows. The same
``quicktok-v1==0.4.0`` wheel on PyPI (MIT) that gives o200k also bundles cl100k_base's ranks
(``quicktok/data/cl100k.vocab``); re-serialised in tiktoken's format they are byte for byte OpenAI's
``cl100k_base.tiktoken``: sha256 ``223921b7...b2a7``, the hash ``tiktoken_ext/openai_public.py`` pins (tiktoken
0.14.0). It ships xz-compressed (550 KB, ``assets/cl100k_base.tiktoken.xz``); ``tokenizer.json`` is derived from it on
demand exactly as for o200k (model/o200k.py: the same code, cl100k's split regex) and kept in the user's cache under a
digest of its inputs.

Checked against published ids: llama.cpp's converter names a BPE pre-tokenizer by the sha256 of the ids the real
tokenizer gives its probe text, and records ``a8594e3e...f79e`` as "dbrx" (DBRX tokenizes with cl100k_base too;
``conversion/base.py`` in the llama-cpp-python 0.3.36 sdist). Phi-4's tokenizer has no added token in that text, so
its hash is the same; ``tests/unit/core/test_phi4_family.py`` checks ours gives it. Rebuild the shipped ranks with
``python -m qlora_phi3.model.cl100k --wheel quicktok_v1-0.4.0-...whl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qlora_phi3.family import PHI4
from qlora_phi3.model.o200k import ASSET as _O200K_ASSET
from qlora_phi3.model.o200k import TiktokenVocab, main, write_tokenizer

__all__ = ["CL100K", "CL100K_PATTERN", "CL100K_SHA256", "LLAMA_CPP_CHKHSH", "write_phi4_tokenizer"]

# sha256 of openaipublic's cl100k_base.tiktoken, as tiktoken_ext/openai_public.py (tiktoken 0.14.0) pins it.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's split regex in the form tokenizers' Regex accepts (tiktoken's pat_str uses possessive quantifiers;
# these alternatives match the same pre-tokens): the string microsoft/phi-4's tokenizer.json carries, as
# torchtune's models/phi4/_tokenizer.py quotes it (CL100K_PATTERN).
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's hash of the ids cl100k_base gives its chktxt probe (conversion/base.py: 'dbrx').
LLAMA_CPP_CHKHSH = "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e"
LLAMA_CPP_PRE = "dbrx"

CL100K = TiktokenVocab("cl100k_base", _O200K_ASSET.with_name("cl100k_base.tiktoken.xz"), CL100K_SHA256,
                       CL100K_PATTERN, PHI4)


def write_phi4_tokenizer(out_dir: Path, model_max_length: int = 16384) -> Path:
    """Write Phi-4's tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into ``out_dir``."""
    return write_tokenizer(CL100K, out_dir, model_max_length)


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    sys.exit(main(vocab=CL100K))
