"""The ML core of spkd: model creation, feature taps, SP/KD losses, data, the training engine.

Importing this package must stay cheap and torch-free: `models.spec` and `models.callbacks`
are shared with the API, which never imports torch. Import torch-using modules explicitly.
"""
