"""Phi-4-mini's tokenizer, rebuilt offline from the real o200k_base vocabulary.

Phi-4-mini-instruct tokenizes with OpenAI's o200k_base byte-level BPE (ids 0-199997, ``<|endoftext|>`` 199999,
``<|endofprompt|>`` 200018) plus its own chat and tool tokens (200019-200028), in 200,064 embedding rows. The Hub
is out of reach here; the vocabulary is not: the ``quicktok-v1==0.4.0`` wheel on PyPI (MIT) bundles o200k_base's
merge ranks (``quicktok/data/o200k.vocab``). Re-serialised in tiktoken's own format, those ranks are byte for
byte OpenAI's ``o200k_base.tiktoken``: sha256 ``446a9538...1a2d``, the hash tiktoken itself pins. We ship that
file xz-compressed (1.2 MB, ``assets/o200k_base.tiktoken.xz``) and build the Hugging Face ``tokenizer.json``
from it on demand (o200k's split regex, GPT-2 byte mapping, merges derived from the ranks as transformers'
tiktoken converter does). The result is checked against a published token sequence: llama.cpp identifies a
BPE pre-tokenizer by the sha256 of the ids the real tokenizer gives its ``chktxt`` probe, and records
``ccc2ef01...352e`` for o200k (``Xenova/gpt-4o``, ``conversion/base.py`` in the llama-cpp-python 0.3.36 sdist);
``tests/unit/core/test_family.py`` checks our rebuild gives that hash.

What is from memory rather than from a file we could read offline: Phi-4-mini's added-token ids (recorded
from its published tokenizer files when the family was added: docs/models.md), its chat template (family.py) and which added tokens are "special". Rebuild
the shipped ranks with ``python -m qlora_phi3.model.o200k --wheel quicktok_v1-0.4.0-...whl``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import lzma
import struct
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI4_MINI

__all__ = ["O200K_SHA256", "O200K_PATTERN", "LLAMA_CPP_CHKHSH", "CHKTXT", "load_ranks", "tokenizer_json",
           "write_phi4_mini_tokenizer"]

ASSET = Path(__file__).resolve().parent.parent / "assets" / "o200k_base.tiktoken.xz"
# sha256 of openaipublic's o200k_base.tiktoken (tiktoken_ext/openai_public.py pins the same).
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_RANKS = 199998
# o200k_base's split regex (tiktoken_ext/openai_public.py; the same string is in Xenova/gpt-4o's tokenizer.json,
# quoted in llama.cpp's llama-vocab.cpp as "original regex from tokenizer.json").
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# llama.cpp's probe text and the hash of the ids o200k gives it (conversion/base.py, get_vocab_base_pre).
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
          '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
LLAMA_CPP_CHKHSH = "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e"
# Added tokens that are not "special" (decoded as text, like Phi-4-mini's tool markup).
_NOT_SPECIAL = ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _parse_tiktoken(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """o200k_base's merge ranks from the shipped asset, checked against OpenAI's published sha256."""
    try:
        data = lzma.decompress(ASSET.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise UserError(f"{ASSET}: cannot read the o200k vocabulary ({e}); reinstall qlora-phi3.") from None
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise UserError(f"{ASSET}: not o200k_base (sha256 differs from {O200K_SHA256}); reinstall qlora-phi3.")
    return _parse_tiktoken(data)


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges from tiktoken ranks, as transformers' tiktoken converter derives them: every split of a token
    into two tokens, ordered by the token's rank (then by the parts' ranks)."""
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:  # the parts' ranks may exceed the token's: tiktoken allows it
                local.append((rank, ranks[left], ranks[right], left, right))
        merges.extend(sorted(local))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def _cache_file() -> Path:
    """Where the derived ``tokenizer.json`` is kept between processes. Its name is a digest of everything the
    derivation reads (this module, the family facts, the vocabulary asset, the tokenizers version), so a change to
    any of them derives it afresh instead of reading a stale file."""
    import os

    import tokenizers

    from qlora_phi3 import family

    digest = hashlib.sha256()
    for part in (Path(__file__).read_bytes(), Path(family.__file__).read_bytes(), ASSET.read_bytes(),
                 tokenizers.__version__.encode()):
        digest.update(hashlib.sha256(part).digest())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-phi3" / "o200k"
    return cache / f"phi4-mini-tokenizer-{digest.hexdigest()[:16]}.json"


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """Phi-4-mini's ``tokenizer.json``: o200k_base with Phi-4-mini's added tokens. Deriving the merges takes ~10 s
    (a 2-core Xeon with avx512_bf16), so the result is kept in the user's cache (:func:`_cache_file`) and in this process."""
    from qlora_phi3.files import atomic_write_text

    cached = _cache_file()
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _derive_tokenizer_json()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, text)
    except OSError:  # a read-only home: derived again next time, nothing else lost
        pass
    return text


def _derive_tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = load_ranks()
    byte_map = _bytes_to_unicode()
    enc = lambda b: "".join(byte_map[x] for x in b)  # noqa: E731
    vocab = {enc(token): rank for token, rank in ranks.items()}
    # The added tokens sit in the model's vocabulary too: tokenizers gives an added token that the model does not
    # know the next free id, whatever id the JSON says, and o200k's ids have gaps (199998, 200000-200017).
    vocab.update(PHI4_MINI.special_ids)
    merges = [(enc(a), enc(b)) for a, b in _merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added tokens at their published ids (add_tokens would number them itself); the gaps of o200k (199998,
    # 200000-200017) and the rows past 200028 are embedding rows no token maps to.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": text not in _NOT_SPECIAL}
        for text, i in sorted(PHI4_MINI.special_ids.items(), key=lambda kv: kv[1])]
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


def write_phi4_mini_tokenizer(out_dir: Path, model_max_length: int = 131072) -> Path:
    """Write Phi-4-mini's tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into ``out_dir``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()), bos_token=PHI4_MINI.bos_token,
        eos_token=PHI4_MINI.eos_token, unk_token=PHI4_MINI.eos_token, pad_token=PHI4_MINI.pad_token,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False, padding_side="left")
    tok.chat_template = PHI4_MINI.chat_template
    tok.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # As Phi-4-mini's own tokenizer_config.json: GPT2Tokenizer is how llama.cpp's converter recognises a
    # byte-level BPE Phi (conversion/phi.py); no automatic bos / eos.
    config.update(tokenizer_class="GPT2Tokenizer", add_bos_token=False, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def _ranks_from_quicktok(wheel: Path) -> bytes:
    """o200k_base.tiktoken rebuilt from the quicktok-v1 wheel's o200k.vocab (u32 count; per token: u16 length,
    the bytes, u32 rank)."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read("quicktok/data/o200k.vocab")
    (n,), off, rows = struct.unpack_from("<I", data, 0), 4, []
    for _ in range(n):
        (length,) = struct.unpack_from("<H", data, off)
        token = data[off + 2:off + 2 + length]
        (rank,) = struct.unpack_from("<I", data, off + 2 + length)
        off += 6 + length
        rows.append((rank, token))
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in sorted(rows))


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - regeneration entry point
    parser = argparse.ArgumentParser(prog="python -m qlora_phi3.model.o200k", description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, required=True,
                        help="quicktok_v1-0.4.0 wheel (pip download --no-deps quicktok-v1==0.4.0)")
    args = parser.parse_args(argv)
    data = _ranks_from_quicktok(args.wheel)
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        print(f"error: {args.wheel}: its o200k vocabulary is not o200k_base (sha256 differs)", file=sys.stderr)
        return 2
    tmp = ASSET.with_name(ASSET.name + ".tmp")
    tmp.write_bytes(lzma.compress(data, preset=9))
    tmp.replace(ASSET)
    print(ASSET)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
