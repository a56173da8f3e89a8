"""The GGUF output format: `--to gguf:TYPE` with TYPE a llama-quantize file type (Q4_K_M, Q8_0, ...)."""

from __future__ import annotations

from pathlib import Path

from quantkit.calib.imatrix import Imatrix
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Job, OutputFormat, Target
from quantkit.formats.gguf import writer
from quantkit.formats.gguf.auto import auto_file_type, auto_metadata, plan_auto
from quantkit.formats.gguf.calibrated import calibrate, gptq_metadata, wants_gptq
from quantkit.formats.gguf.file import Value, string, u32
from quantkit.formats.gguf.mixtures import ModelFacts, file_type, is_ggml_type, plan_types
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.formats.overrides import parse_override
from quantkit.model import Model
from quantkit.plan import Plan, format_plan
from quantkit.source.gguf_file import GGUFFile


def model_facts(model: Model) -> ModelFacts:
    mapping = mapping_for(model.arch)
    hp = {k.split(".", 1)[1]: v.value for k, v in mapping.hparams().items()}
    return ModelFacts(arch=mapping.gguf_arch, n_layer=model.arch.num_layers, n_head=hp["attention.head_count"],
                      n_head_kv=hp.get("attention.head_count_kv", hp["attention.head_count"]),
                      n_expert=hp.get("expert_count", 0), has_output=not model.arch.tie_word_embeddings)


def gguf_facts(source: GGUFFile) -> ModelFacts:
    """ModelFacts from a GGUF file's metadata (what llama-quantize reads from its input)."""
    arch = source.metadata("general.architecture")

    def first(key, default=0):
        value = source.metadata(f"{arch}.{key}")
        return value[0] if isinstance(value, list) else (default if value is None else value)

    return ModelFacts(arch=arch, n_layer=first("block_count"), n_head=first("attention.head_count"),
                      n_head_kv=first("attention.head_count_kv", first("attention.head_count")),
                      n_expert=first("expert_count"), has_output="output.weight" in source.tensors)


def imatrix_metadata(path: Path, imatrix: Imatrix) -> dict[str, Value]:
    """The provenance keys llama-quantize writes when it uses an imatrix (tools/quantize/quantize.cpp)."""
    meta = {"quantize.imatrix.file": string(str(path)),
            "quantize.imatrix.entries_count": u32(len(imatrix.sums)),
            "quantize.imatrix.chunks_count": u32(imatrix.chunk_count)}
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = string(imatrix.datasets[0])
    return meta


class GGUFFormat(OutputFormat):
    name = "gguf"
    example = "Q4_K_M"

    def __init__(self):
        self._imatrix: tuple[Path, Imatrix] | None = None
        self._auto: dict[Plan, dict[str, Value]] = {}  # an automatic plan -> its quantize.auto.* metadata

    def parse_spec(self, spec: str) -> Target:
        base, gptq = spec.strip(), ""
        if base.lower().endswith("-gptq"):  # levels chosen by GPTQ on calibration (quantkit.formats.gguf.calibrated)
            base, gptq = base[:-len("-gptq")], "-gptq"
        if base.lower() == "auto":  # convert names it after its budget (auto-4.00bpw)
            return Target(self.name, "auto" + gptq)
        return Target(self.name, file_type(base).name + gptq)

    def file_name(self, model_name: str, target: Target) -> str:
        return f"{model_name}-{target.spec}.gguf"

    def describe(self, plan: Plan) -> str:
        if plan.target.startswith("auto"):
            meta = self._auto.get(plan, {})
            predicted = meta["quantize.auto.predicted_kld"].value if meta else float("nan")
            spec = "auto-gptq" if plan.target.startswith("auto-gptq") else "auto"
            return format_plan(plan, heading=f"gguf:{spec} ({meta['quantize.auto.budget'].value if meta else ''}), "
                                             f"predicted KLD {predicted:.5f}")
        ft = file_type(plan.target)
        return format_plan(plan, heading=f"file type {ft.name} (general.file_type = {ft.ftype})")

    def prepare(self, source, options: ConvertOptions) -> None:
        self._imatrix = (options.imatrix, Imatrix.load(options.imatrix)) if options.imatrix is not None else None
        self._auto = {}  # one run's choices (the format object outlives a convert call)

    def reads_scheme(self, scheme: str) -> bool:
        return is_ggml_type(scheme)

    def plan(self, source, target: Target, options: ConvertOptions) -> Plan:
        if target.spec.startswith("auto"):
            return self._plan_auto(source, target, options)
        if isinstance(source, GGUFFile):
            shapes, facts = {n: source.shape(n) for n in source.tensors}, gguf_facts(source)
        else:
            shapes, facts = {t.name: t.shape for t in mapping_for(source.arch).tensors()}, model_facts(source)
        # options.imatrix, not the loaded file: a recipe's dry run plans variants before their imatrix exists
        if wants_gptq(target.spec) and not isinstance(source, Model):
            raise ConfigError(f"gguf:{target.spec} calibrates on the model's forward: give the HF checkpoint, not a "
                              "GGUF file")
        return plan_types(shapes, facts, target.spec.removesuffix("-gptq"), imatrix=options.imatrix is not None,
                          tensor_types=[t for t in options.tensor_types if self.reads_scheme(parse_override(t).scheme)],
                          output_tensor_type=options.output_tensor_type,
                          token_embedding_type=options.token_embedding_type, pure=options.pure)

    def _plan_auto(self, source, target: Target, options: ConvertOptions) -> Plan:
        if not isinstance(source, Model):
            raise ConfigError("gguf:auto measures the model's forward: give the HF checkpoint, not a GGUF file")
        if options.budget is None:
            raise ConfigError("gguf:auto needs a budget: --target-bpw 4.0, --target-size 20GB or "
                              "--fit-vram 24GiB --ctx 32768")
        overrides = [t for t in options.tensor_types if self.reads_scheme(parse_override(t).scheme)]
        shapes = {t.name: t.shape for t in mapping_for(source.arch).tensors()}
        base = plan_types(shapes, model_facts(source), "Q8_0", imatrix=self._imatrix is not None,
                          tensor_types=overrides, output_tensor_type=options.output_tensor_type,
                          token_embedding_type=options.token_embedding_type, pure=True)
        importance = self._imatrix[1].importances() if self._imatrix is not None else None
        metadata = writer.model_metadata(source, 0, options.name or source.source.path.name, options.tokenizer_pre)
        if self._imatrix is not None:
            metadata.update(imatrix_metadata(*self._imatrix))
        plan, predicted, sensitivity = plan_auto(source, base, options.budget, options, importance, metadata,
                                                 gptq=wants_gptq(target.spec))
        self._auto[plan] = auto_metadata(options.budget, predicted, sensitivity.key)
        return plan

    def write(self, source, jobs: list[Job], options: ConvertOptions) -> list[list[Path]]:
        importance, extra = None, {}
        if self._imatrix is not None:
            importance = self._imatrix[1].importances()
            extra = imatrix_metadata(*self._imatrix)
        gptq = gptq_metadata(options.calib, options.calib_samples, options.calib_ctx, options.damp) \
            if any(wants_gptq(job.target.spec) for job in jobs) else {}
        outputs = [writer.GGUFOutput(job.path, self._file_type(job.plan), job.plan.schemes,
                                     {**extra, **self._auto.get(job.plan, {}),
                                      **(gptq if wants_gptq(job.target.spec) else {})}) for job in jobs]
        split = writer.parse_size(options.split_max_size) if options.split_max_size else None
        common = dict(importance=importance, split_max_bytes=split, force=options.force, threads=options.threads,
                      progress=options.progress)
        if isinstance(source, GGUFFile):
            return writer.requantize(source, outputs, device=options.device, **common)
        calibrated_jobs = [i for i, job in enumerate(jobs) if wants_gptq(job.target.spec)]
        encoded: list = [None] * len(jobs)
        if calibrated_jobs:
            writer.check_outputs([outputs[i] for i in calibrated_jobs], options.force)  # before hours of calibration
            spools = calibrate(source, [(jobs[i].path, jobs[i].plan.schemes) for i in calibrated_jobs],
                               importance or {}, calib=options.calib, samples=options.calib_samples,
                               ctx=options.calib_ctx, damp=options.damp, progress=options.progress)
            for i, spool in zip(calibrated_jobs, spools, strict=True):
                encoded[i] = spool
        written = writer.convert(source, outputs, name=options.name or source.source.path.name,
                                 tokenizer_pre=options.tokenizer_pre, encoded=encoded, **common)
        for spool in encoded:
            if spool is not None:
                spool.remove()
        for job in jobs:
            if job.plan in self._auto:  # the chosen mix, reviewable and reusable beside the file
                job.plan.save(plan_file(job.path))
        return written

    @staticmethod
    def _file_type(plan: Plan) -> int:
        return auto_file_type(plan) if plan.target.startswith("auto") else file_type(plan.target).ftype


def plan_file(path: Path) -> Path:
    """Where an automatic mix's plan is stored: beside its GGUF, <name>.plan.json."""
    return path.with_name(path.name.removesuffix(".gguf") + ".plan.json")


FORMAT = GGUFFormat()
