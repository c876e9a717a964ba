"""The ML core of spkd: model creation, feature taps, SP/KD losses, data, the training engine.

Importing this package must stay cheap and torch-free: `common.spec` and `common.reporter`
are shared with the API, which never imports torch. Import torch-using modules explicitly.
"""
