"""The README.md of a run directory and of its adapter: what it is and the commands that use it.

TRL's trainers write a model card at every checkpoint that reads "a fine-tuned version of [None]" for a
local or embedded base, and PEFT writes an empty template into the adapter; ours name the base model, the
recipe and run record, and the next commands (chat, merge, export).
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.files import atomic_write_text

__all__ = ["ModelCardMixin", "write_card"]


def card_text(run_dir: Path, base_model: str, kind: str = "run") -> str:
    what = ("the LoRA adapter of a qlora-phi3 run" if kind == "adapter"
            else "a qlora-phi3 run directory: its checkpoints, and the finished adapter in `adapter/`")
    return (f"---\nlibrary_name: peft\nbase_model: {base_model}\ntags:\n- qlora-phi3\n- lora\n---\n\n"
            f"# {run_dir.name}\n\nThis is {what}, trained on `{base_model}` (4-bit NF4 base). The recipe it ran is "
            f"`recipe.yaml` and its record (settings, losses, memory, speed, versions) is `run.json` in the run "
            f"directory.\n\n"
            f"```bash\nqlora-phi3 chat {run_dir}                    # try it (adapter on its 4-bit base)\n"
            f"qlora-phi3 merge {run_dir} --out merged/     # one fp16 model for transformers\n"
            f"qlora-phi3 export {run_dir} --out gguf/      # GGUF for llama.cpp / Ollama / LM Studio\n```\n")


def write_card(directory: Path, run_dir: Path, base_model: str, kind: str = "run") -> None:
    atomic_write_text(Path(directory) / "README.md", card_text(Path(run_dir), base_model, kind))


class ModelCardMixin:
    """Replaces TRL's ``create_model_card`` (called at every checkpoint save) with our run card."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        if not self.is_world_process_zero():
            return
        peft_config = getattr(self.model, "peft_config", {}).get("default")
        base = getattr(peft_config, "base_model_name_or_path", None) or "the base model"
        write_card(Path(self.args.output_dir), Path(self.args.output_dir), base)
