"""One progress channel: Progress events from convert and imatrix, rendered as log lines off a terminal."""

import logging
import math

import torch

from quantkit import convert as api
from quantkit.calib import collect_imatrix
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.model import Model
from quantkit.progress import CliProgress, Progress


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_renderer_off_a_terminal_logs_counts_and_eta_every_tenth(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="quantkit.progress")
    with CliProgress(tty=False, clock=clock) as show:
        for done in range(0, 201):
            clock.now = done * 0.5  # 2 units a second: 200 take 100 s
            show(Progress("quantize", done, 200, "weights"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11  # the start, then each 10%
    assert lines[0] == "quantize: 0/200 weights (0%), 0 s elapsed"
    assert lines[5] == "quantize: 100/200 weights (50%), 50 s elapsed, ETA 50 s"
    assert lines[-1] == "quantize: 200/200 weights (100%), 2 min elapsed"


def test_renderer_logs_slow_stages_every_30_seconds(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="quantkit.progress")
    show = CliProgress(tty=False, clock=clock)
    for done in range(0, 50):
        clock.now = done * 10.0  # 1000 units at 0.1 per second: 10% takes 1000 s
        show(Progress("imatrix", done, 1000, "chunks"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 + 49 // 3  # the start, then every 30 s
    assert "imatrix: 3/1000 chunks (0%), 30 s elapsed, ETA 2.8 h" in lines


def test_convert_reports_weights_in_order(model_cache, tmp_path):
    events = []
    folder = model_cache("llama")
    api.convert(folder, ["gguf:Q4_K_M", "gguf:Q8_0"], tmp_path, progress=events.append)
    with Model(folder) as model:
        total = sum(math.prod(t.shape) for t in mapping_for(model.arch).tensors())
    assert {(e.stage, e.total, e.unit) for e in events} == {("quantize", total, "weights")}
    done = [e.done for e in events]
    assert done[0] == 0 and done[-1] == total and done == sorted(done)


def test_imatrix_reports_chunks(model_cache):
    events = []
    with Model(model_cache("llama")) as model:
        collect_imatrix(model, torch.randint(3, 512, (4 * 64,)), ctx=64, progress=events.append)
        layers = model.arch.num_layers
    # layer-major: every chunk through layer 0, then through layer 1, ...
    assert events == [Progress("imatrix", done, 4 * layers, "chunk-layers") for done in range(4 * layers + 1)]
