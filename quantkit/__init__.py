"""quantkit: turn LLM checkpoints into the quantized variants people deploy, and measure them."""

import os

# torch's OpenMP threads spin at every op's barrier; beside another busy process the spinning steals the time
# the others wait for (`quantkit eval` on tiny-qwen2 beside one busy process: 74 s spinning, 14.5 s passive;
# bench/shared_cores.py). The OpenMP runtime reads this once, when torch loads it, so it is set here, before any
# quantkit module imports torch; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
