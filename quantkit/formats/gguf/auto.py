"""`--to gguf:auto`: each quantizable tensor's llama.cpp type chosen from measured costs to fit a budget.

Groups are the GGUF tensors (llama.cpp types are per tensor). Candidates are CANDIDATES after llama.cpp's row-size
fallback, each measured (quantkit.calib.sensitivity) with the codecs and importance vectors the writer then uses,
so a candidate's cost is that of the very bytes written. The chosen mix is a plain plan of llama.cpp types:
nothing llama.cpp does not already load. Tensors an override decides (--tensor-type, --output-tensor-type,
--token-embedding-type) keep their type and count as fixed bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import torch
from gguf.constants import GGMLQuantizationType

from quantkit.calib.data import scoring_samples
from quantkit.calib.gptq import CalibrationHessians
from quantkit.calib.sensitivity import EMBEDDING, Group, Sensitivity, measure_sensitivity
from quantkit.errors import ConfigError
from quantkit.formats import SENSITIVITY_METHODS
from quantkit.formats.gguf.calibrated import HEAD_SOURCE, encode_linear
from quantkit.formats.gguf.file import ALIGNMENT, TensorEntry, Value, f32, header_bytes, string
from quantkit.formats.gguf.mixtures import FILE_TYPES, allows_quantization, row_fallback, tensor_nbytes
from quantkit.formats.gguf.tensors import GGUFTensor, mapping_for
from quantkit.formats.gguf.writer import importance_rows
from quantkit.model import Model
from quantkit.plan import Plan
from quantkit.plan.allocate import Budget, BudgetError, Option, allocate
from quantkit.plan.vram import vram_plan
from quantkit.quant import get_codec
from quantkit.quant.ggml_gptq import DEFAULT_DAMP_PERCENT, ENCODING

log = logging.getLogger(__name__)

CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# Also measured on MoE models, for the tensors the imatrix covers (they need it): the 1.5-3.4 bit types that let
# the routed experts (most of the weights) go low while what every token passes through stays high.
I_QUANT_CANDIDATES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
_CHUNK_ELEMENTS = 1 << 20  # rows encoded at a time, as the writer does on CPU
# general.file_type of a mix: the file type named after the type holding most of its weights
_FILE_TYPE_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
                 "Q8_0": "Q8_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
                 "Q5_0": "Q5_0", "Q5_1": "Q5_1", "F16": "F16", "BF16": "BF16", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M",
                 "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S"}


def stage_of(name: str, n_layers: int) -> int:
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return EMBEDDING if name == "token_embd.weight" else n_layers


def auto_file_type(plan: Plan) -> int:
    """LLAMA_FTYPE for general.file_type: llama.cpp only prints it, so name the mix by its main type."""
    weights: dict[str, int] = {}
    for e in plan.entries:
        if e.quantized:
            weights[e.scheme] = weights.get(e.scheme, 0) + e.n_elements
    main = max(weights, key=weights.get)
    return FILE_TYPES[_FILE_TYPE_OF.get(main, "F16")].ftype


class Candidates:
    """The measurement's view of a model in llama.cpp's layout: one group per GGUF tensor, and each candidate's
    decoded weights mapped back to the checkpoint tensors the forward reads."""

    def __init__(self, model: Model, importance: dict[str, torch.Tensor] | None, grid_iquants: bool = True):
        self.arch, self.mapping = model.arch, mapping_for(model.arch)
        self.tensors = {t.name: t for t in self.mapping.tensors()}
        self.weights = model.weights()
        self.importance = importance or {}
        self.moe = grid_iquants and any(spec.routed_experts for spec in self.arch.layers())

    def group(self, name: str) -> Group:
        t = self.tensors[name]
        types = CANDIDATES + (I_QUANT_CANDIDATES if self.moe and name in self.importance else ())
        schemes = list(dict.fromkeys(row_fallback(name, t.shape[-1], c) for c in types))
        return Group(name, stage_of(name, self.arch.num_layers), tuple(schemes),
                     tuple(tensor_nbytes(s, t.shape) for s in schemes))

    def anchors(self, groups: list[Group], method: str) -> dict[str, str] | None:
        """The proxy method's anchor per tensor: Q3_K (or its row fallback). A low type, so that the anchor's
        measured KLD stands well above the measurement's noise (Q4_K anchors chose mixes 6-10% worse on
        tiny-deepseek). The default (None) is the proxy: as good a mix as measuring every candidate on the bundled
        models, better predictions on MoE, about 5x fewer layer-forwards on 28-61-layer models
        (bench/results/sensitivity_proxy.md)."""
        if method == "output":
            return None
        if method not in (None, *SENSITIVITY_METHODS):
            raise ConfigError(f"unknown sensitivity method {method!r}: {', '.join(SENSITIVITY_METHODS)}")
        return {g.name: row_fallback(g.name, self.tensors[g.name].shape[-1], "Q3_K") for g in groups}

    def _float(self, tensor: GGUFTensor) -> torch.Tensor:
        return torch.cat([p.float() for p in tensor.pieces(self.weights)]).reshape(tensor.shape)

    def _sources(self, tensor: GGUFTensor) -> list[str]:
        """The checkpoint tensors rebuilt from this GGUF tensor (found on meta tensors when not declared: a
        split like DeepSeek's kv_b -> attn_k_b + attn_v_b)."""
        if tensor.sources:
            return list(tensor.sources)
        stage = stage_of(tensor.name, self.arch.num_layers)
        names = self.arch.layer_weight_names(stage) if 0 <= stage < self.arch.num_layers else []
        found = []
        for name in names:
            read: list[str] = []

            def record(gguf_name: str, read: list[str] = read) -> torch.Tensor:
                read.append(gguf_name)
                return torch.empty(self.tensors[gguf_name].shape, device="meta")

            self.mapping.weights_from_gguf(record)(name)
            if tensor.name in read:
                found.append(name)
        return found

    def degrade(self, group: Group, scheme: str) -> dict[str, torch.Tensor]:
        tensor = self.tensors[group.name]
        codec, width = get_codec(scheme), tensor.shape[-1]
        n_pieces = tensor.shape[0] if len(tensor.shape) == 3 else 1
        vectors = importance_rows(self.importance.get(tensor.name), n_pieces, width, tensor.name)
        rows = max(1, _CHUNK_ELEMENTS // width)
        decoded = []
        for piece, vector in zip(tensor.pieces(self.weights), vectors, strict=True):
            piece = piece.float()
            for start in range(0, piece.shape[0], rows):
                chunk = piece[start:start + rows].contiguous()
                decoded.append(codec.decode(codec.encode(chunk, vector), width).to(piece.device))
        quantized = torch.cat(decoded).reshape(tensor.shape)
        rebuild = self.mapping.weights_from_gguf(
            lambda n: quantized if n == tensor.name else self._float(self.tensors[n]))
        return {name: rebuild(name) for name in self._sources(tensor)}


class GPTQCandidates(Candidates):
    """The candidates as a -gptq file encodes them (quantkit.formats.gguf.calibrated): each linear's tensor with
    ggml_gptq from its Hessian, the rest (token embeddings, DeepSeek's k_b/v_b, the router) as the writer encodes
    it. A stage's Hessians are built by `prepare` before its candidates are degraded, on the file's own calibration
    samples (`hessians`), not on the few the measurement scores. The measured costs then reflect that GPTQ shrinks
    the linears' errors but not the embeddings'. The Hessians come from the float model's activations, where the
    file's pass feeds each layer its quantized predecessors' outputs: each group is measured alone, everything else
    float, as for the other candidates."""

    def __init__(self, model: Model, importance: dict[str, torch.Tensor] | None, damp: float,
                 hessians: CalibrationHessians):
        super().__init__(model, importance, grid_iquants=False)
        self.damp, self.source = damp, hessians
        self.stage, self.hessians = None, None

    def prepare(self, stage: int, weights) -> None:
        self.stage = stage
        if stage < self.arch.num_layers:
            self.hessians = self.source.layer(stage, weights)
        else:
            self.hessians = {HEAD_SOURCE: self.source.head(weights)}

    def degrade(self, group: Group, scheme: str) -> dict[str, torch.Tensor]:
        tensor = self.tensors[group.name]
        if not (tensor.per_source and group.stage == self.stage and all(s in self.hessians for s in tensor.sources)):
            return super().degrade(group, scheme)
        codec, width = get_codec(scheme), tensor.shape[-1]
        vectors = importance_rows(self.importance.get(tensor.name), len(tensor.sources), width, tensor.name)
        decoded = {}
        for source, vector in zip(tensor.sources, vectors, strict=True):
            w = self.weights(source).float()
            data = encode_linear(codec, w, self.hessians[source], vector, self.damp)
            decoded[source] = codec.decode(data, width).to(w.device)
        return decoded


def _header_bytes(metadata: dict[str, Value], base: Plan, tensor_order: list[str]) -> int:
    """The file's bytes besides tensor data: header (its size does not depend on the types) and, at most, the
    alignment padding after every tensor."""
    shapes = {e.name: e.shape for e in base.entries}
    entries = [TensorEntry(n, shapes[n], GGMLQuantizationType.F32) for n in tensor_order]
    return len(header_bytes(metadata, entries)) + ALIGNMENT * len(entries)


def auto_metadata(budget: Budget, predicted: float, sensitivity_key: str) -> dict[str, Value]:
    """What the file records of how its mix was chosen (its per-tensor types are in the tensor table)."""
    return {"quantize.auto.budget": string(budget.option), "quantize.auto.predicted_kld": f32(predicted),
            "quantize.auto.sensitivity_key": string(sensitivity_key)}


def plan_auto(model: Model, base: Plan, budget: Budget, options, importance, metadata: dict[str, Value],
              gptq: bool = False) -> tuple[Plan, float, Sensitivity]:
    """The mix of least predicted KLD within the budget: (plan, predicted KLD, the measurement used).
    `base`: the plan of every tensor as a pure Q8_0 file with the command's overrides (which stay fixed);
    `metadata`: the file's other metadata (for --target-size). `gptq`: for a -gptq file: the candidates measured as
    GPTQ encodes them (GPTQCandidates), without the grid i-quants, whose levels GPTQ cannot choose (measured on
    tiny-deepseek: with them auto-gptq gained 13-18% over auto, where uniform -gptq files gain 34%)."""
    metadata = {**metadata, **auto_metadata(budget, 0.0, "0" * 32)}  # the same size as the keys written
    damp = DEFAULT_DAMP_PERCENT if options.damp is None else options.damp
    if gptq:  # encoded from the Hessians of the samples the file's GPTQ pass uses
        hessians = CalibrationHessians.of_calibration(model, options.calib, options.calib_samples, options.calib_ctx)
        candidates = GPTQCandidates(model, importance, damp, hessians)
    else:
        candidates = Candidates(model, importance)
    # every quantizable tensor is measured, overridden or not, so one measurement serves any set of overrides
    groups = [candidates.group(e.name) for e in base.entries if e.quantized and allows_quantization(e.name, e.shape)]
    free = {e.name for e in base.entries if e.quantized and not e.note.startswith("--")} & {g.name for g in groups}
    if not free:
        raise ConfigError("gguf:auto has no tensor left to choose a type for: the overrides decide them all")
    fixed = sum(e.nbytes for e in base.entries if e.name not in free)
    floor = fixed + sum(min(g.nbytes) for g in groups if g.name in free)
    limit = _tensor_budget(model, base, budget, metadata)
    if floor > limit:  # before measuring anything
        raise BudgetError(budget.refusal("gguf:auto", "tensor", floor, limit, base.n_elements))
    samples = scoring_samples(model, options.calib, options.sensitivity_samples, options.calib_ctx,
                              options.calib_samples if gptq else 0)
    sensitivity = measure_sensitivity(model, "gguf", samples, groups, candidates.degrade, path=options.sensitivity,
                                      progress=options.progress,
                                      anchors=candidates.anchors(groups, options.sensitivity_method),
                                      importance=_digest(importance),
                                      calib=str(options.calib) if options.calib else None,
                                      **({"prepare": candidates.prepare, "gptq_damp": damp,
                                         "gptq_hessians": candidates.source.setting, "gptq_encoding": ENCODING}
                                         if gptq else {}))
    options_by_group = {g.name: [Option(s, b, sensitivity.costs[g.name][s])
                                 for s, b in zip(g.schemes, g.nbytes, strict=True)] for g in groups if g.name in free}
    chosen = allocate(options_by_group, limit - fixed)
    entries = tuple(replace(e, scheme=chosen[e.name].scheme, nbytes=chosen[e.name].nbytes, note="auto")
                    if e.name in chosen else e for e in base.entries)
    plan = Plan("gguf", f"auto{'-gptq' if gptq else ''}-{budget.label}", entries)
    predicted = sum(o.cost for o in chosen.values())
    log.info("gguf:auto %s: %.4f bpw, predicted KLD %.5f", budget.option, plan.bpw, predicted)
    return plan, predicted, sensitivity


def _digest(importance: dict[str, torch.Tensor] | None) -> str | None:
    """The importance vectors' identity for the sensitivity key: another imatrix gives other costs."""
    if not importance:
        return None
    digest = hashlib.sha256()
    for name in sorted(importance):
        digest.update(name.encode() + importance[name].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _overhead(model: Model, base: Plan, budget: Budget) -> int:
    """VRAM besides the weights at the budget's context: KV cache and every GPU's compute buffers."""
    estimate = vram_plan(model.arch, base, budget.ctx, budget.kv_type or "f16")
    return estimate.kv_cache + budget.gpus * estimate.compute


def _tensor_budget(model: Model, base: Plan, budget: Budget, metadata: dict[str, Value]) -> int:
    """The budget as bytes of tensor data."""
    if budget.bpw is not None:
        return int(budget.bpw * base.n_elements / 8)
    if budget.size is not None:
        return budget.size - _header_bytes(metadata, base, [e.name for e in base.entries])
    return budget.gpus * budget.vram - _overhead(model, base, budget)


__all__ = ["CANDIDATES", "I_QUANT_CANDIDATES", "Candidates", "auto_file_type", "auto_metadata", "plan_auto", "stage_of"]
