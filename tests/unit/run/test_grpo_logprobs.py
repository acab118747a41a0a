"""GRPO's completion log-probs come from the label-only head (run/logprobs.py), at the sampling temperature:
they must equal what TRL's own fused head gives, or the policy ratio and KL would be off."""

import pytest
import torch

from qlora_phi3.model.tiny import TINY_MODEL_DIR


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_label_only_logprobs_equal_trls_fused_head_at_the_sampling_temperature(temperature):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from qlora_phi3.run.logprobs import install_label_logprobs

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as GRPO pads prompts
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-5] = -100  # only the last 5 (completion) tokens are scored, as GRPOTrainer does

    def logps(install):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
        add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
        install(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -5:], out.entropy[:, -5:]

    theirs = logps(lambda m: None)
    ours = logps(lambda m: install_label_logprobs(m, chunk_tokens=3, temperature=temperature))
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=1e-4)
