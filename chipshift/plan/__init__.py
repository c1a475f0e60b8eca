"""Plan and measure: what a training run costs on a fleet, and how fast this chip is.

    flops.py     training FLOPs per token: 6N + 12 L A S
    memory.py    bytes per chip: model states by strategy (DDP, FSDP/ZeRO-3), activations
    estimate.py  a Plan from a model, a token budget and a chip; every figure names its source
    bench.py     measurements on the local device, written as a JSON a plan can use
    report.py    tables and bar charts
    cli.py       `chipshift plan`, `chipshift bench`, `chipshift bench compare`
"""
