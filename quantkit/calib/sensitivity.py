"""Sensitivity: what each tensor group costs the model's output at each candidate scheme, measured once.

A group is what a format quantizes with one scheme (a GGUF tensor; a compressed-tensors fused input group). For
every group and candidate scheme the group alone is replaced by its quantized-and-decoded weights, and the
model's next-token distribution is compared with the float model's on the calibration samples: the cost is the
mean KL divergence per token, measured at the model's output (not a per-tensor proxy). quantkit.plan.allocate
then adds the costs of a mix, which assumes the groups' errors add up; bench/auto_quality.py measures how well
that sum predicts the KLD of the written files.

Layer-major, like the calibration engine: the float hidden states of every sample are advanced one layer at a
time; the candidates of layer i start from layer i's float inputs, and their hidden states then go through the
remaining layers together, in batches bounded by `batch_bytes`, each later layer read once per batch. Cost: one
float pass for the reference outputs plus, per candidate, one forward of its own layer and of every layer after it
(about candidates x layers / 2 layer-forwards over the calibration tokens).

The proxy method (`anchors`) measures one candidate per group (its anchor) that way, and prices the group's other
candidates from what they change where they act: cost = the anchor's KLD x the candidate's mean squared change of
its stage's output (the embedding's, or the decoder layer's) / the anchor's. That is one layer-forward per
candidate instead of about layers / 2, calibrated per group against a measured KLD (bench/sensitivity_proxy.py
compares the two methods).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.arch.base import Architecture, Weights
from quantkit.calib.engine import LayerWeights
from quantkit.errors import ConfigError
from quantkit.output import write_error
from quantkit.progress import Progress, ProgressCallback

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = 1
EMBEDDING = -1  # stage of a group read by the embedding (and, when tied, by the head too)


@dataclass(frozen=True)
class Group:
    """One unit of the allocation: quantized with one scheme, measured alone."""

    name: str  # the format's name for it (a GGUF tensor name, ...)
    stage: int  # the first place it acts: EMBEDDING, a decoder layer 0..L-1, or L for the output head
    schemes: tuple[str, ...]  # candidate schemes
    nbytes: tuple[int, ...]  # stored bytes at each candidate scheme


# degrade(group, scheme) -> the checkpoint tensors (float32) the group changes, quantized with `scheme` and decoded
Degrade = Callable[[Group, str], "dict[str, torch.Tensor]"]
# prepare(stage, weights): called before a decoder layer's or the head's candidates are degraded, with that
# stage's weights, for a degrade that depends on the stage (GPTQ encodes from the Hessians of its inputs)
Prepare = Callable[[int, Weights], None]


@dataclass
class Sensitivity:
    """Measured cost (mean KLD per token vs the float model) of every group at every candidate scheme."""

    format: str
    key: str  # digest of what it was measured on: model files, config, calibration ids, groups and schemes
    tokens: int
    seconds: float
    groups: list[Group]
    costs: dict[str, dict[str, float]]  # group name -> scheme -> mean KLD
    method: str = "output"  # every candidate measured at the model output, or "proxy" (see `measure`'s anchors)

    def to_json(self) -> dict:
        return {"version": SENSITIVITY_VERSION, "format": self.format, "key": self.key, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "metric": "mean KL divergence per token vs the float model",
                "method": self.method,
                "groups": [{"name": g.name, "stage": g.stage, "candidates": [
                    {"scheme": s, "bytes": b, "kld": self.costs[g.name][s]}
                    for s, b in zip(g.schemes, g.nbytes, strict=True)]} for g in self.groups]}

    @classmethod
    def from_json(cls, data: dict, origin: str) -> Sensitivity:
        if data.get("version") != SENSITIVITY_VERSION:
            raise ConfigError(f"{origin}: sensitivity file version {data.get('version')!r} is not "
                              f"{SENSITIVITY_VERSION}; measure it again with this quantkit")
        try:
            groups, costs = [], {}
            for g in data["groups"]:
                cands = g["candidates"]
                groups.append(Group(g["name"], int(g["stage"]), tuple(c["scheme"] for c in cands),
                                    tuple(int(c["bytes"]) for c in cands)))
                costs[g["name"]] = {c["scheme"]: float(c["kld"]) for c in cands}
            return cls(data["format"], data["key"], int(data["tokens"]), float(data["seconds"]), groups, costs,
                       data.get("method", "output"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: not a quantkit sensitivity file ({exc!r} is missing or malformed); "
                              "delete it to measure again") from None

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc}); delete it to measure again") from None
        return cls.from_json(data, str(path))


def sensitivity_key(model, fmt: str, samples: Sequence[torch.Tensor], groups: Sequence[Group], **settings) -> str:
    """What a measurement depends on; a stored file is reused only when its key matches."""
    digest = hashlib.sha256()
    # the samples' lengths too: the same tokens cut into other windows sit at other positions
    digest.update(json.dumps([__version__, fmt, model.source.file_identity(), model.config, settings,
                              [(g.name, g.schemes) for g in groups], [len(s) for s in samples]],
                             sort_keys=True, default=str).encode())
    for s in samples:
        digest.update(s.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _overlay(base: Weights, replaced: dict[str, torch.Tensor]) -> Weights:
    if not replaced:
        return base
    return lambda name: replaced[name] if name in replaced else base(name)


@torch.no_grad()
def measure(arch: Architecture, weights: Weights, samples: Sequence[torch.Tensor], groups: Sequence[Group],
            degrade: Degrade, *, device: torch.device | str = "cpu", batch_bytes: int = 1 << 30,
            progress: ProgressCallback | None = None, done: dict[str, dict[str, float]] | None = None,
            checkpoint: Callable[[dict[str, dict[str, float]]], None] | None = None,
            prepare: Prepare | None = None, anchors: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Mean KLD per token of the model with one group at one scheme, for every group and candidate scheme.
    Samples must have one length: they run as one batch (the statistics need no per-sample bit-exactness).
    `done`: costs already measured (a resumed run), not measured again; `checkpoint(costs)` is called with every
    cost so far after each stage (the embedding, each layer, the head). A candidate's cost does not depend on
    which others share its batch, so a resumed measurement equals an uninterrupted one.
    `anchors` (the proxy method): group name -> its scheme measured at the output, the others priced by their
    stage-output error relative to it. Where the anchor leaves the stage's output unchanged, the group's candidate
    of largest error is the anchor instead. Groups of the head's stage are measured at the output."""
    device = torch.device(device)
    if len({len(s) for s in samples}) != 1:
        raise ConfigError("sensitivity samples must all have the same number of tokens")
    ids = torch.stack(list(samples)).to(device)
    positions = torch.arange(ids.shape[1], device=device)
    n_layers, tokens = arch.num_layers, ids.numel()
    by_stage: dict[int, list[tuple[Group, str]]] = {}
    for g in groups:
        if not EMBEDDING <= g.stage <= n_layers:
            raise ConfigError(f"group {g.name}: stage {g.stage} is outside the model")
        by_stage.setdefault(g.stage, []).extend((g, s) for s in g.schemes if s not in (done or {}).get(g.name, {}))
    anchors = dict(anchors or {})
    for g in groups:
        if g.name in anchors and anchors[g.name] not in g.schemes:
            raise ValueError(f"group {g.name}: anchor {anchors[g.name]} is not one of its schemes {g.schemes}")

    def proxied(group: Group) -> bool:
        return group.name in anchors and group.stage < n_layers

    # as step() counts: a candidate measured at the output is one step per layer after its own, plus the head
    total = 2 * n_layers + sum(1 if proxied(g) and anchors[g.name] != s else max(n_layers - stage, 1)
                               for stage, c in by_stage.items() for g, s in c)
    steps = 0

    def step(n: int = 1) -> None:
        nonlocal steps
        steps += n
        if progress is not None:
            progress(Progress("sensitivity", steps, total, "layer-forwards"))

    def layer_forward(index: int, layer: Weights, hidden: torch.Tensor) -> torch.Tensor:
        return arch.layer_forward(index, layer, hidden, positions)

    # The float model's final hidden states: the reference every candidate is compared with.
    embedded = arch.embed(weights, ids)
    final = embedded
    for index in range(n_layers):
        layer = LayerWeights(weights)
        final = layer_forward(index, layer, final)
        layer.clear()
        step()
    head = LayerWeights(weights)  # norm and lm_head, read once
    batch = max(1, batch_bytes // (4 * tokens * arch.hidden_size))
    costs: dict[str, dict[str, float]] = {g.name: dict((done or {}).get(g.name, {})) for g in groups}

    def finish(states: list[tuple[Group, str, dict, torch.Tensor]], start: int) -> None:
        """Candidates' hidden states entering layer `start` through the rest of the model, then scored."""
        for index in range(start, n_layers):
            layer = LayerWeights(weights)
            for c, (g, s, replaced, hidden) in enumerate(states):
                states[c] = (g, s, replaced, layer_forward(index, _overlay(layer, replaced), hidden))
                step()
            layer.clear()
        sums = [0.0] * len(states)
        for k in range(ids.shape[0]):  # one sample's logits at a time: vocab x tokens can be large
            reference = torch.log_softmax(arch.head(head, final[k:k + 1]).float(), dim=-1)
            p = reference.exp()
            for c, (_, _, replaced, hidden) in enumerate(states):
                logp = torch.log_softmax(arch.head(_overlay(head, replaced), hidden[k:k + 1]).float(), dim=-1)
                sums[c] += float((p * (reference - logp)).sum(-1).clamp_min(0).sum())
        for c, (group, scheme, _, _) in enumerate(states):
            costs[group.name][scheme] = sums[c] / tokens
        step(len(states))

    def run_stage(stage: int, stage_weights: Weights | None, output: torch.Tensor | None,
                  forward: Callable[[dict], torch.Tensor]) -> None:
        """The stage's candidates: `forward(replaced)` is a candidate's output of the stage, `output` the float
        model's (what the proxy method compares with)."""
        cands = by_stage.get(stage, [])
        if not cands:
            return
        if prepare is not None and stage_weights is not None:
            prepare(stage, stage_weights)
        pending: list[tuple[Group, str, dict, torch.Tensor]] = []
        errors: dict[str, tuple[str, dict[str, float]]] = {}

        def add(state: tuple[Group, str, dict, torch.Tensor]) -> None:
            pending.append(state)
            if len(pending) >= batch:
                finish(pending, stage + 1)
                pending.clear()

        by_group: dict[Group, list[str]] = {}
        for g, s in cands:
            by_group.setdefault(g, []).append(s)
        for g, schemes in by_group.items():
            if not proxied(g):
                for s in schemes:
                    replaced = degrade(g, s)
                    add((g, s, replaced, forward(replaced)))
                continue
            preferred, err, kept = anchors[g.name], {}, None
            for s in schemes:
                replaced = degrade(g, s)
                out = forward(replaced)
                err[s] = float((out - output).float().pow(2).mean())
                if s == preferred:
                    kept = (g, s, replaced, out)
                else:
                    step()
            anchor = preferred if err[preferred] > 0 else max(err, key=err.get)
            if anchor != preferred:
                replaced = degrade(g, anchor)
                kept = (g, anchor, replaced, forward(replaced))
            errors[g.name] = (anchor, err)
            add(kept)
        if pending:
            finish(pending, stage + 1)
        for name, (anchor, err) in errors.items():
            for s, e in err.items():
                if s != anchor:
                    costs[name][s] = costs[name][anchor] * (e / err[anchor] if err[anchor] > 0 else 1.0)
        if checkpoint is not None:
            checkpoint(costs)

    run_stage(EMBEDDING, None, embedded, lambda r: arch.embed(_overlay(weights, r), ids))
    hidden = embedded
    for index in range(n_layers):
        layer = LayerWeights(weights)
        output = layer_forward(index, layer, hidden)
        run_stage(index, layer, output, lambda r, index=index, layer=layer, hidden=hidden:
                  layer_forward(index, _overlay(layer, r), hidden))
        hidden = output
        layer.clear()
        step()
    run_stage(n_layers, head, None, lambda r: final)
    return costs


def measure_sensitivity(model, fmt: str, samples: Sequence[torch.Tensor], groups: Sequence[Group], degrade: Degrade,
                        *, path: Path | None = None, progress: ProgressCallback | None = None,
                        prepare: Prepare | None = None, anchors: Mapping[str, str] | None = None,
                        **settings) -> Sensitivity:
    """The stored measurement at `path` (default: the statistics cache, under a name holding the key) when it was
    made on the same model, samples, groups, method and settings; otherwise measured now and saved there. While
    measuring, `<path>.part` holds every cost so far: a killed run resumes from it (an unwritable cache only costs
    reuse). `anchors`: the proxy method (`measure`)."""
    if anchors:
        settings |= {"proxy_anchors": dict(anchors)}
    key = sensitivity_key(model, fmt, samples, groups, **settings)
    cached = path is None
    if cached:
        from quantkit.calib.cache import default_cache_dir

        path = default_cache_dir() / f"{fmt}-sensitivity-{key}.json"
    if path.is_file():
        stored = Sensitivity.load(path)
        if stored.key == key:
            log.info("sensitivity reused from %s", path)
            return stored
        log.warning("%s was measured on another model, text, candidate set or method; measuring again", path)
    part = path.with_name(path.name + ".part")
    done = _partial(part, key)
    if done:
        log.info("sensitivity resumed from %s: %d of %d candidates measured", part,
                 sum(map(len, done.values())), sum(len(g.schemes) for g in groups))

    def checkpoint(costs: dict[str, dict[str, float]]) -> None:
        _write_json(part, {"version": SENSITIVITY_VERSION, "key": key, "costs": costs}, cached)

    started = time.monotonic()
    costs = measure(model.arch, model.weights(), samples, groups, degrade, device=model.device, progress=progress,
                    done=done, checkpoint=checkpoint, prepare=prepare, anchors=anchors)
    result = Sensitivity(fmt, key, sum(len(s) for s in samples), time.monotonic() - started, list(groups), costs,
                         "proxy" if anchors else "output")
    _write_json(path, result.to_json(), cached)
    part.unlink(missing_ok=True)
    return result


def _partial(part: Path, key: str) -> dict[str, dict[str, float]]:
    """The costs a killed measurement of the same key left; anything else there is ignored (and replaced)."""
    try:
        data = json.loads(part.read_text())
        return data["costs"] if data.get("version") == SENSITIVITY_VERSION and data.get("key") == key else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_json(path: Path, data: dict, cached: bool) -> None:
    """Written whole or not at all (tmp + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        if not cached:
            raise write_error(path, exc) from None
