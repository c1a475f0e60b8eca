"""Cross-chip parity: dump what every module computes, compare two dumps, verify handoffs.

    dump.py     run a fixed batch forward and backward (and K AdamW steps) with hooks on
                every module; write statistics, tensors (safetensors, up to a budget),
                losses and the environment as plain files
    compare.py  per-module metrics between two dumps (and a float64 reference), verdicts
                by dtype-aware thresholds, the first diverging module forward and backward
    report.py   report.md, report.json and the PNG figures
    handoff.py  dump a checkpoint on two devices, compare, record the verdict in its
                sidecar; `chipshift.model.checkpoint.check_handoff_allowed` lets later
                stages refuse a failed handoff
    train.py    one training config on two targets, loss curves compared step by step
"""
