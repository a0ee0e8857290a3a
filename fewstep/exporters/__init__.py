"""Export students: diffusers pipeline folders and LoRA weights (fewstep's own format is `save_denoiser`)."""

from fewstep.exporters.diffusers import export_lora, export_pipeline, model_card, scheduler_for

__all__ = ["export_lora", "export_pipeline", "model_card", "scheduler_for"]
