"""The real Phi-3 tokenizer, rebuilt offline from the copy of its vocabulary that llama.cpp ships.

The Hub is out of reach here, yet the embedded model must tokenize exactly as
``microsoft/Phi-3-mini-4k-instruct`` does, or the labels, the renders and the stops we test are not the
ones users get. llama.cpp keeps Phi-3's vocabulary for its tokenizer tests, ``models/ggml-vocab-phi-3.gguf``
(converted from Phi-3-mini-4k-instruct's files), with ``ggml-vocab-phi-3.gguf.inp`` / ``.out``: 46 test
strings and the ids the Hugging Face Phi-3 tokenizer gives them. All three are vendored in the
``llama-cpp-python==0.3.36`` source distribution on the package index. Phi-3 and llama.cpp are MIT-licensed.

This script reads that vocabulary with transformers (``from_pretrained(gguf_file=...)``, which rebuilds
Phi-3's normalizer and derives the BPE merges from the scores), then adds what Phi-3-mini-4k-instruct's
``tokenizer_config.json`` has and the GGUF lacks:

* ``rstrip=True`` on ids 32001-32010 (``<|assistant|>`` .. ``<|user|>``) and on ``</s>`` (not special):
  whitespace after them is part of the token, so ``<|user|>\\n Hi`` is ``[32010, 6324]``;
* the chat template, pad = ``<unk>``, no automatic ``<s>`` / ``</s>``, eos = ``<|endoftext|>`` (32000);
* 32011 tokens, as Phi-3's tokenizer has: the GGUF's ``[PAD32011]`` .. ``[PAD32063]`` only fill the
  embedding matrix (32064 rows) and are dropped.

It also writes ``tokenizer.model``, a SentencePiece model built from the GGUF's pieces, scores and types
with Llama-2's (= Phi-3's) settings, because llama.cpp's ``convert_hf_to_gguf.py`` refuses a Phi-3
directory without one. Every output is checked against the reference ids (transformers for
``tokenizer.json``, the ``sentencepiece`` library for ``tokenizer.model``); any mismatch fails the build.

    python -m qlora_phi3.model.tokenizer [--sdist llama_cpp_python-0.3.36.tar.gz] [--out DIR]

Without ``--sdist`` it runs ``pip download`` for the sdist (76 MB). Needs ``pip install
'qlora-phi3[tokenizer-build]'`` (gguf, sentencepiece, protobuf); loading the result needs none of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora_phi3.data.read import PHI3_TOKEN_TEXTS
from qlora_phi3.errors import UserError

__all__ = ["PHI3_ADDED_TOKENS", "build_tokenizer", "check_against_reference", "read_reference_cases"]

SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
VOCAB_NAME = "ggml-vocab-phi-3.gguf"
_MEMBER_DIR = "vendor/llama.cpp/"
# sha256 of the files we take from the sdist: a different vocabulary cannot slip in unnoticed.
SOURCE_SHA256 = {
    f"models/{VOCAB_NAME}": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    f"models/{VOCAB_NAME}.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    f"models/{VOCAB_NAME}.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    "LICENSE": None,  # llama.cpp's MIT notice, copied next to the reference files
}
REFERENCE_SEPARATOR = "\n__ggml_vocab_test__\n"  # as llama.cpp's tests/test-tokenizer-0 splits the .inp file

N_PIECES = 32000  # the SentencePiece vocabulary (Llama 2's); ids above are added tokens
# Phi-3-mini-4k-instruct's added tokens (its tokenizer_config.json "added_tokens_decoder"): id -> (text, rstrip,
# special). </s> is the one not special; it and 32001-32010 swallow the whitespace after them.
_ADDED_IDS = (0, 1, 2, *range(32000, 32011))
PHI3_ADDED_TOKENS = {i: (text, i == 2 or i > 32000, i != 2) for i, text in zip(_ADDED_IDS, PHI3_TOKEN_TEXTS)}
# Cases the GGUF's reference file does not cover: Phi-3's rstrip after special tokens.
RSTRIP_CASES = [
    ("<|user|>\n Hi", [32010, 6324]),
    ("<|user|>\nHi<|end|>\n<|assistant|>\n\n  Hello<|end|>\n", [32010, 6324, 32007, 32001, 15043, 32007]),
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
           "-d", str(dest)]
    print("fetching the vocabulary:", " ".join(cmd[2:]), file=sys.stderr)
    if subprocess.run(cmd, check=False).returncode != 0:
        raise UserError(f"pip could not download {SDIST_REQUIREMENT}; download it elsewhere with "
                        f"`pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}` and pass --sdist PATH.")
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise UserError(f"pip download left no llama_cpp_python-*.tar.gz in {dest}.")
    return found[0]


def extract_sources(sdist: Path, dest: Path) -> dict[str, Path]:
    """The vocabulary, its reference files and llama.cpp's license from ``sdist`` into ``dest``, checked by
    hash. Members are read by name (never ``extractall``), so nothing else in the archive is written."""
    wanted = {name: None for name in SOURCE_SHA256}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                _, _, inner = member.name.partition("/")  # strip "llama_cpp_python-X.Y.Z/"
                if inner.startswith(_MEMBER_DIR) and inner[len(_MEMBER_DIR):] in wanted and member.isfile():
                    wanted[inner[len(_MEMBER_DIR):]] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"--sdist {sdist}: not a readable .tar.gz ({e}).") from None
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise UserError(f"--sdist {sdist}: has no {_MEMBER_DIR}{missing[0]}; use the {SDIST_REQUIREMENT} sdist.")
    out = {}
    for name, data in wanted.items():
        if SOURCE_SHA256[name] and _sha256(data) != SOURCE_SHA256[name]:
            raise UserError(f"--sdist {sdist}: {name} has sha256 {_sha256(data)}, expected {SOURCE_SHA256[name]}; "
                            f"this is not the vocabulary of {SDIST_REQUIREMENT}.")
        path = dest / Path(name).name
        path.write_bytes(data)
        out[name] = path
    return out


def read_reference_cases(inp_path: Path, out_path: Path) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs from llama.cpp's ``.inp`` / ``.out`` files."""
    texts = inp_path.read_text(encoding="utf-8").split(REFERENCE_SEPARATOR)
    ids = out_path.read_text(encoding="utf-8").split("\n")
    if texts[-1] == "" and ids[-1] == "":  # both files end with their separator
        texts, ids = texts[:-1], ids[:-1]
    if len(texts) != len(ids):
        raise ValueError(f"{inp_path.name} holds {len(texts)} cases but {out_path.name} {len(ids)}")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def check_against_reference(encode, cases: list[tuple[str, list[int]]], what: str) -> None:
    """Raise if ``encode(text)`` differs from the expected ids for any case."""
    bad = [(t, want, encode(t)) for t, want in cases if encode(t) != want]
    if bad:
        t, want, got = bad[0]
        raise ValueError(f"{what}: {len(bad)} of {len(cases)} reference cases differ, e.g. {t!r}: "
                         f"expected {want}, got {got}")


def _hf_tokenizer(gguf_path: Path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from qlora_phi3.model.tiny import MODEL_MAX_LENGTH, PHI3_CHAT_TEMPLATE

    # transformers rebuilds Phi-3's normalizer and the merges (from the scores); the rest of Phi-3's
    # tokenizer_config.json has no GGUF field, so it is set on the tokenizers JSON below.
    raw = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    spec = json.loads(raw.backend_tokenizer.to_str())
    model = spec["model"]
    # The BPE model holds the 32000 SentencePiece pieces, as Phi-3's tokenizer.json does; ids 32000-32010 are
    # added tokens and the GGUF's [PAD32011].. rows are only embedding padding. No merge involves those.
    model["vocab"] = {tok: i for tok, i in model["vocab"].items() if i < N_PIECES}
    vocab = model["vocab"]
    model["merges"] = [m for m in model["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    model["unk_token"] = "<unk>"
    spec["added_tokens"] = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": rstrip, "normalized": False,
         "special": special}
        for i, (text, rstrip, special) in sorted(PHI3_ADDED_TOKENS.items())]
    spec["post_processor"] = None  # Phi-3's config: add_bos_token and add_eos_token are false
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="<|endoftext|>",
        unk_token="<unk>", pad_token="<unk>", padding_side="left", model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False)
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def _gguf_vocab(gguf_path: Path) -> tuple[list[str], list[float], list[int]]:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    return (list(fields["tokenizer.ggml.tokens"].contents()), list(fields["tokenizer.ggml.scores"].contents()),
            list(fields["tokenizer.ggml.token_type"].contents()))


def sentencepiece_model_bytes(gguf_path: Path) -> bytes:
    """Phi-3's ``tokenizer.model`` (Llama 2's SentencePiece BPE model) rebuilt from the GGUF.

    convert_hf_to_gguf overwrote ids 0-2 with the added-token entries of tokenizer_config.json (score
    -1000, <unk> as CONTROL, </s> as USER_DEFINED); a SentencePiece model has them as UNKNOWN / CONTROL /
    CONTROL with score 0, so those three are restored. The rest is the GGUF's, piece for piece."""
    # By hand because the sentencepiece library only makes a model by training one; its protobuf schema
    # (sentencepiece_model_pb2) is how a model with given pieces and scores is written.
    from sentencepiece import sentencepiece_model_pb2 as spm

    tokens, scores, types = _gguf_vocab(gguf_path)
    proto = spm.ModelProto()
    kind = spm.ModelProto.SentencePiece
    for i in range(N_PIECES):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = tokens[i], scores[i], types[i]  # GGUF and SentencePiece share the type numbers
    for i, t in ((0, kind.UNKNOWN), (1, kind.CONTROL), (2, kind.CONTROL)):
        proto.pieces[i].score, proto.pieces[i].type = 0.0, t
    # Llama 2's trainer and normalizer settings (what its tokenizer.model carries); the ones that matter when
    # encoding are BPE, byte_fallback, the dummy prefix and keeping runs of whitespace.
    ts = proto.trainer_spec
    ts.model_type, ts.vocab_size = spm.TrainerSpec.BPE, N_PIECES
    ts.byte_fallback, ts.split_digits, ts.allow_whitespace_only_pieces = True, True, True
    ts.split_by_unicode_script = ts.split_by_whitespace = ts.split_by_number = True
    ts.max_sentencepiece_length, ts.character_coverage = 16, 0.99995
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    ts.unk_surface = " \u2047 "
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", True, False, True
    return proto.SerializeToString(deterministic=True)


def _check_sentencepiece(model_path: Path, cases) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    if sp.get_piece_size() != N_PIECES:
        raise ValueError(f"tokenizer.model has {sp.get_piece_size()} pieces, expected {N_PIECES}")
    check_against_reference(lambda t: sp.encode(t, out_type=int), cases, "tokenizer.model (sentencepiece)")


def build_tokenizer(sdist: Path | None, out_dir: Path, reference_dir: Path | None) -> list[Path]:
    """Rebuild and check the tokenizer files into ``out_dir``; copy the reference cases to ``reference_dir``."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sources = extract_sources(sdist or _download_sdist(tmp / "sdist"), tmp)
        gguf_path = sources[f"models/{VOCAB_NAME}"]
        cases = read_reference_cases(sources[f"models/{VOCAB_NAME}.inp"], sources[f"models/{VOCAB_NAME}.out"])

        tokenizer = _hf_tokenizer(gguf_path)
        stage = tmp / "stage"
        tokenizer.save_pretrained(stage)
        # One line instead of save_pretrained's indented JSON: 1.4 MB instead of 3.6 MB in the package.
        tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"), pretty=False)
        # Said explicitly, as Phi-3's tokenizer_config.json does: GGUF export copies them, and llama.cpp adds <s>
        # to a SentencePiece vocabulary that does not say otherwise.
        config_path = stage / "tokenizer_config.json"
        config = {**json.loads(config_path.read_text()), "add_bos_token": False, "add_eos_token": False}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (stage / "tokenizer.model").write_bytes(sentencepiece_model_bytes(gguf_path))
        # Check what was written, as it loads back, before anything replaces the shipped files.
        loaded = AutoTokenizer.from_pretrained(str(stage))
        encode = lambda t: loaded(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        check_against_reference(encode, cases, "tokenizer.json (transformers)")
        check_against_reference(lambda t: loaded(t)["input_ids"], RSTRIP_CASES, "Phi-3 rstrip after special tokens")
        if len(loaded) != N_PIECES + 11 or loaded.pad_token != "<unk>" or loaded.eos_token_id != 32000:
            raise ValueError(f"unexpected tokenizer: {len(loaded)} tokens, pad {loaded.pad_token}, eos "
                             f"{loaded.eos_token_id}")
        _check_sentencepiece(stage / "tokenizer.model", cases)

        written = []
        for f in sorted(stage.iterdir()):
            target = out_dir / f.name
            tmp_target = target.with_name(f".{f.name}.tmp")
            tmp_target.write_bytes(f.read_bytes())
            tmp_target.replace(target)
            written.append(target)
        if reference_dir is not None:
            reference_dir.mkdir(parents=True, exist_ok=True)
            for name in (f"models/{VOCAB_NAME}.inp", f"models/{VOCAB_NAME}.out"):
                written.append(reference_dir / Path(name).name)
                written[-1].write_bytes(sources[name].read_bytes())
            written.append(reference_dir / "LICENSE-llama.cpp")
            written[-1].write_bytes(sources["LICENSE"].read_bytes())
    return written


def main(argv: list[str] | None = None) -> int:
    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    repo_tests = Path(__file__).resolve().parents[2] / "tests" / "data"
    parser = argparse.ArgumentParser(prog="python -m qlora_phi3.model.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", type=Path, help=f"the {SDIST_REQUIREMENT} sdist (default: pip download it)")
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="where the tokenizer files go")
    parser.add_argument("--reference-dir", type=Path,
                        default=repo_tests / "phi3_vocab" if repo_tests.is_dir() else None,
                        help="where the .inp/.out reference cases go (default: tests/data/phi3_vocab in a checkout)")
    args = parser.parse_args(argv)
    try:
        for path in build_tokenizer(args.sdist, args.out, args.reference_dir):
            print(path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    sys.exit(main())
