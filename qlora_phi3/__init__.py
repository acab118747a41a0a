"""qlora-phi3: QLoRA fine-tuning of Microsoft Phi-3 Mini on one consumer GPU, or offline on a CPU."""

__version__ = "0.1.0"
__all__ = ["__version__"]
