"""Planning: which type each tensor gets before anything is quantized (llama.cpp mixtures today)."""

from quantkit.plan.ggml_mixtures import (
    FileType,
    ModelFacts,
    Plan,
    PlanEntry,
    file_type,
    file_types,
    format_plan,
    ggml_type,
    parse_tensor_type,
    plan_types,
    quantize_order,
    tensor_nbytes,
)

__all__ = [
    "FileType",
    "ModelFacts",
    "Plan",
    "PlanEntry",
    "file_type",
    "file_types",
    "format_plan",
    "ggml_type",
    "parse_tensor_type",
    "plan_types",
    "quantize_order",
    "tensor_nbytes",
]
