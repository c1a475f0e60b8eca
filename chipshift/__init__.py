"""chipshift: pre-train, post-train and serve language models on any accelerator.

The package is a library; each stage (`chipshift pretrain`, `sft`, `dpo`, `serve`, ...)
is a thin command over it. Device-specific knowledge lives only in `chipshift.devices`.
"""

__version__ = "0.1.0"
