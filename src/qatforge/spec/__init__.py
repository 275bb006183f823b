"""The spec layer: what the Snakefile needs at parse time (config checks and per-run slices,
formats, report columns, QAT schemes, llama.cpp quant types and options, capability facts),
torch-free: its modules import the standard library and each other only.
"""
