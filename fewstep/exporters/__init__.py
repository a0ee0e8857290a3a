"""Export students: fewstep's own safetensors format, diffusers pipeline folders and LoRA weights, each with the
one model card (`card.py`)."""

from fewstep.exporters.card import model_card
from fewstep.exporters.diffusers import export_lora, export_pipeline, scheduler_for
from fewstep.exporters.safetensors import export_safetensors

EXPORT_FORMATS = ("safetensors", "diffusers", "lora")

__all__ = ["EXPORT_FORMATS", "export_lora", "export_pipeline", "export_safetensors", "model_card", "scheduler_for"]
