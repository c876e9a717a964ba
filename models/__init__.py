"""The torch engine of spkd: everything that trains, evaluates and exports a student.

`pipeline` is the entry point (validate a job, run its stages); the wings hold the rest:
`data/` (datasets and batches), `networks/` (timm models, weights, feature taps), `training/`
(the engine, checkpoints, a job's run state), `results/` (export, report, statistics, tracking),
`stages/` (one module per stage) and `methods/` (one module per distillation method).
models/ imports only common/ of ours (docs/architecture.md#2-dependency-rules), never app/, core/
or workers/. Importing this package (and a wing) is cheap: import torch-using modules explicitly.
"""
