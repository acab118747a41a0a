"""The reference to beat: plain transformers + PEFT + TRL + bitsandbytes QLoRA, as the Phi-3 cookbook's
QLoRA notebook teaches it, kept honest.

What it does, as the notebook does: NF4 + double quantization with bf16 compute (``compute_dtype``: on a
CPU without native bf16, fp32, the dtype that machine runs natively, as ``compute_dtype: auto`` picks for ours),
``prepare_model_for_kbit_training`` (gradient checkpointing, input grads, fp32 upcast of the
non-quantized weights), a LoRA ``get_peft_model``, and TRL's ``SFTTrainer`` with micro-batches padded
to their longest sample. What we changed so that it is not handicapped: the LoRA targets are the fused
Phi-3 names (the notebook's Llama names miss a third of the adapters), the objective is
the same assistant-only loss (the same pre-tokenized labels as ours), and the model, data split,
optimizer, learning rate and tokens per optimizer step are the caller's, i.e. the same as ours. The
installed SFTTrainer already computes its loss with TRL's fused LM head; we keep that, it is the
library's default.
"""

from __future__ import annotations

import time

__all__ = ["run_reference"]


def run_reference(model_dir: str, train_enc, eval_enc, *, micro_batch_size: int, grad_accum: int, epochs: float,
                  lr: float, lora, optimizer: str, seed: int, output_dir: str, attn_implementation: str = "sdpa",
                  compute_dtype: str = "bfloat16", evaluate: bool = True, device: str = "cpu", max_steps: int = -1):
    """Train ``epochs`` passes (or ``max_steps``); returns peak memory (RSS on a CPU), real tokens/s and losses
    (same keys as ours). ``evaluate=False`` skips the eval after the pass (``eval_loss_end`` None)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from qlora_phi3.memory.meter import PeakMemory
    from qlora_phi3.model.load import _keep_cpu_4bit_format

    dtype = getattr(torch, compute_dtype)
    transformers.set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token  # the cookbook pads with unk, right side
    tokenizer.padding_side = "right"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device}, attn_implementation=attn_implementation)
    _keep_cpu_4bit_format(model)  # CPU-only bitsandbytes quirk (see qlora_phi3.model.load); no effect on a GPU
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=list(lora.target_modules)))  # fused names: qkv_proj, o_proj, gate_up_proj, down_proj
    args = SFTConfig(
        output_dir=output_dir, num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=grad_accum, learning_rate=lr,
        lr_scheduler_type="constant", optim=optimizer, gradient_checkpointing=True, bf16=dtype == torch.bfloat16,
        use_cpu=device == "cpu",
        seed=seed, data_seed=seed, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, include_num_input_tokens_seen="non_padding", max_length=None, packing=False,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_enc.to_dataset(),
                         eval_dataset=eval_enc.to_dataset(), processing_class=tokenizer)
    collate, computed = trainer.data_collator, [0]

    def counting(features):  # tokens computed per micro-batch: its rows x its longest sample
        batch = collate(features)
        computed[0] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    meter = PeakMemory(device, cpu_measure="rss")  # as `qlora-phi3 train` measures ours
    meter.reset()
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    peak = meter.read()
    meter.close()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    real = int(trainer.state.num_input_tokens_seen)
    return {
        "peak_gib": peak.peak_allocated_gib,
        "tokens": real,
        "padded_tokens": computed[0] - real,
        "train_seconds": train_seconds,
        "tokens_per_second": trainer.state.num_input_tokens_seen / train_seconds,
        "train_losses": losses,
        "eval_loss_end": trainer.evaluate()["eval_loss"] if evaluate else None,
        "steps": trainer.state.global_step,
    }
