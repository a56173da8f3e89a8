"""Planning, format-neutral: which scheme each tensor gets (Plan), and what a plan costs in VRAM at a context.
Each output format produces plans its own way (GGUF: llama.cpp's mixture rules, quantkit.formats.gguf.mixtures)."""

from quantkit.plan.plan import Plan, PlanEntry, bits_per_weight, format_plan

__all__ = ["Plan", "PlanEntry", "bits_per_weight", "format_plan"]
