"""Plan and measure: what a training run costs on a fleet, and how fast this chip is.

Its FLOP and memory arithmetic lives beside the model (`chipshift.model.flops`,
`chipshift.model.memory`), where the training loop uses it too.

    estimate.py  a Plan from a model, a token budget and a chip; every figure names its source
    bench.py     measurements on the local device, written as a JSON a plan can use
    report.py    tables and bar charts
    cli.py       `chipshift plan`, `chipshift bench`, `chipshift bench compare`
"""
