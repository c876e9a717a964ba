"""Training a model: `engine` (the train/eval loops of a stage), `oom` (halve the batch on
out-of-memory), `guards` (NaN/inf and zero-step checks that fail a broken run), `autoweight` (the
`auto` SP/KD weights), `checkpoint` (resume state), `run` (a job's state while it runs),
`teacher_cache` (the frozen teacher run once per view) and `validation` (misfits before training).
"""
