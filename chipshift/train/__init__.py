"""The one training loop (pre-training, SFT, DPO) and its parts; see `loop`."""
