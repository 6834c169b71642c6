"""came_kernels benchmarks: one script per question, shared plumbing in bench/utils.py.

    python -m bench            # the quick end-to-end run: step + converge + memory (CPU: a few minutes)
    python -m bench step       # ms/step, x AdamW(fused), state bytes/param, peak transient memory, GB/s
    python -m bench converge   # loss curves of AdamW, Adafactor and CAME on a small GPT (offline corpus)
    python -m bench memory     # optimizer-state memory from real allocations, incl. the bf16/int8 momentum options

Outputs (JSON, PNG) go to bench/out/ (gitignored); figures for the README are copied to bench/figures/.
"""
