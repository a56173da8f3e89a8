"""GGUF output (llama.cpp): `--to gguf:TYPE` with TYPE a llama-quantize file type (Q4_K_M, Q8_0, ...).

Modules: format.py (the registered OutputFormat), file.py (the GGUF container: writer, header reader),
tensors.py (llama.cpp's view of an architecture: GGUFMapping) with llama.py / deepseek2.py, mixtures.py
(llama-quantize's per-tensor type rules: the plan), writer.py (streamed conversion from a checkpoint or an
F32/F16/BF16 GGUF), tokenizer.py (tokenizer.* metadata).
"""
