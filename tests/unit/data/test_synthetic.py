"""The bundled data sets are what data/synthetic.py generates (its regeneration entry point writes them): a change
to a generator that would change the shipped files, or files edited by hand, fail here."""

import json
from pathlib import Path

import pytest

from qlora_phi3.data import synthetic

ASSETS = Path(synthetic.__file__).resolve().parent.parent / "assets"


@pytest.mark.parametrize("name,generate", [("tiny_chat", synthetic.generate), ("tiny_prefs", synthetic.generate_pairs),
                                           ("tiny_kto", synthetic.generate_unpaired),
                                           ("tiny_sums", synthetic.generate_prompts)])
def test_the_shipped_sets_are_the_generators_output(name, generate):
    shipped = [json.loads(line) for line in (ASSETS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert generate() == shipped


def test_generated_records_are_distinct():
    for records in (synthetic.generate(300, seed=5), synthetic.generate_pairs(200, seed=5),
                    synthetic.generate_unpaired(200, seed=5)):
        keys = [json.dumps(r, sort_keys=True) for r in records]
        assert len(set(keys)) == len(keys) == len(records)
