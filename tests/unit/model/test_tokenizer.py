"""The shipped tokenizer is Phi-3's: llama.cpp's reference token ids (tests/data/phi3_vocab, from the
llama-cpp-python 0.3.36 sdist, MIT), Phi-3's added tokens with rstrip, its chat template and stops; and the
SentencePiece ``tokenizer.model`` that GGUF export needs gives the same ids."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from qlora_phi3.errors import UserError
from qlora_phi3.model.tiny import TINY_MODEL_DIR, TOKENIZER_FILES
from qlora_phi3.model.tokenizer import (
    PHI3_ADDED_TOKENS, SOURCE_SHA256, VOCAB_NAME, build_tokenizer, check_against_reference, extract_sources,
    read_reference_cases)

REFERENCE = Path(__file__).resolve().parents[2] / "data" / "phi3_vocab"


@pytest.fixture(scope="module")
def cases():
    return read_reference_cases(REFERENCE / f"{VOCAB_NAME}.inp", REFERENCE / f"{VOCAB_NAME}.out")


def test_reference_files_are_the_pinned_ones(cases):
    import hashlib

    for name in (f"{VOCAB_NAME}.inp", f"{VOCAB_NAME}.out"):
        assert hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest() == SOURCE_SHA256[f"models/{name}"]
    assert len(cases) == 46 and ("Hello world", [15043, 3186]) in cases and ("", []) in cases


def test_shipped_tokenizer_matches_reference_ids(tiny_tokenizer, cases):
    check_against_reference(lambda t: tiny_tokenizer(t, add_special_tokens=False)["input_ids"], cases, "shipped")
    # and plain transformers, as a user of a merged model loads it
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))
    check_against_reference(lambda t: plain(t)["input_ids"], cases, "AutoTokenizer")  # no <s> added


def test_reference_check_fails_on_a_mismatch(cases):
    with pytest.raises(ValueError, match=r"1 of 46 reference cases differ, e.g. 'Hello world': expected \[15043, 3186\]"):
        check_against_reference(lambda t: [0] if t == "Hello world" else dict(cases)[t], cases, "x")


def test_tokenizer_model_matches_reference_ids(cases):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TINY_MODEL_DIR / "tokenizer.model"))
    assert sp.get_piece_size() == 32000 and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    check_against_reference(lambda t: sp.encode(t, out_type=int), cases, "tokenizer.model")
    # Same pieces, in the same order, as tokenizer.json's vocabulary.
    vocab = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(3, 32000))


def test_phi3_added_tokens_rstrip_and_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 32011
    for i, (text, _, _) in PHI3_ADDED_TOKENS.items():
        assert tok.convert_tokens_to_ids(text) == i
    assert (tok.eos_token_id, tok.pad_token, tok.unk_token_id, tok.bos_token_id) == (32000, "<unk>", 0, 1)
    # Whitespace after the role tokens and <|end|> belongs to them (docs/pitfalls.md), not after <|endoftext|>.
    assert tok("<|user|>\n Hi", add_special_tokens=False)["input_ids"] == [32010, 6324]
    assert tok("<|assistant|>\n\n\tHi<|end|>\n", add_special_tokens=False)["input_ids"] == [32001, 6324, 32007]
    assert tok("<|endoftext|> Hi", add_special_tokens=False)["input_ids"] == [32000, 29871, 6324]
    assert tok("Hi")["input_ids"] == [6324]  # no automatic <s> or </s>


def test_chat_template_and_generation_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == [32006, 1522, 11473, 29889, 32007, 32010, 6324, 32007, 32001]
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert full.endswith("<|assistant|>\nHello.<|end|>\n<|endoftext|>")


def test_decode_round_trip(tiny_tokenizer):
    text = "Héllo wörld, 日本語! 🦙\n\ttabs  and  spaces"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def _fake_sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_sdist_with_other_files_is_refused(tmp_path):
    files = {name: b"not the vocabulary" for name in SOURCE_SHA256}
    with pytest.raises(UserError, match=r"ggml-vocab-phi-3.gguf has sha256 .* expected 967d7190"):
        extract_sources(_fake_sdist(tmp_path / "a.tar.gz", files), tmp_path)
    del files["LICENSE"]
    with pytest.raises(UserError, match=r"has no vendor/llama.cpp/LICENSE"):
        extract_sources(_fake_sdist(tmp_path / "b.tar.gz", files), tmp_path)
    (tmp_path / "c.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable .tar.gz"):
        extract_sources(tmp_path / "c.tar.gz", tmp_path)


@pytest.mark.skipif(not os.environ.get("QLORA_PHI3_SDIST"),
                    reason="set QLORA_PHI3_SDIST to the llama-cpp-python 0.3.36 sdist (76 MB) to rebuild the tokenizer")
def test_rebuild_from_the_sdist_is_byte_identical(tmp_path):
    build_tokenizer(Path(os.environ["QLORA_PHI3_SDIST"]), tmp_path / "tok", tmp_path / "ref")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "tok" / name).read_bytes() == (TINY_MODEL_DIR / name).read_bytes(), name
    for name in (f"{VOCAB_NAME}.inp", f"{VOCAB_NAME}.out"):
        assert (tmp_path / "ref" / name).read_bytes() == (REFERENCE / name).read_bytes()
