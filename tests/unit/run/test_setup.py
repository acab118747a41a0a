"""run/train.py's setup after the preflight (run/preflight.py), as `qlora-phi3 train` runs them: each thing once
for the whole run: the model reference resolved, the Hub asked, the data read, the context checked."""

from pathlib import Path

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.run.preflight import preflight

TINY_CHATS = Path(__file__).resolve().parents[3] / "qlora_phi3" / "assets" / "tiny_chat.jsonl"


def _counting(monkeypatch, calls: list, module, name: str) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_preflight_then_setup_do_each_thing_once(tmp_path, monkeypatch, capsys):
    import qlora_phi3.data.split as split
    import qlora_phi3.model.load as load
    import qlora_phi3.run.preflight as pre
    import qlora_phi3.run.train as train

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(TINY_CHATS.read_text().splitlines(keepends=True)[:24]) + '{"text": "no chat"}\n')
    calls: list[str] = []
    for module, name in ((load, "resolve_model_path"), (load, "ensure_hub_access"), (split, "load_records"),
                         (pre, "check_context"), (train, "check_context")):
        _counting(monkeypatch, calls, module, name)
    recipe = load_recipe(recipes_dir() / "tiny_cpu.yaml", [f"data.path={data}", "train.sample_prompts=0",
                                                           f"train.output_dir={tmp_path / 'run'}"])
    checked = preflight(recipe)
    run = train.setup(recipe, checked=checked)
    run.meter.close()
    # config, tokenizer, model and LoRA took the one resolved reference; the data went from preflight to training
    assert sorted(calls) == ["check_context", "ensure_hub_access", "load_records", "resolve_model_path"], calls
    assert run.source.name_or_path == recipe.model.name_or_path and run.trainer.model is not None
    assert run.data.dataset["train_samples"] + run.data.dataset["eval_samples"] == 24
    assert f"{data}:25" in capsys.readouterr().out.replace("\n", "")  # the preflight's report, file:line, still said
